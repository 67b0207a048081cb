"""Run untrusted source code in a short-lived, limited child process.

Knows nothing about problems or grading modes: it takes a source string and gives
back what the run did (exit status, capped stdout/stderr, files left in its working
directory, and one structured payload). Every run gets

- a fresh temporary working directory, removed afterwards (the job itself, its output and
  its report travel in memory files, so a run creates no other file on disk);
- an interpreter started with `-I -S` (no user site, no PYTHON* variables, no cwd on
  sys.path) and an environment holding nothing from the parent but a bare PATH;
- rlimits on CPU time, address space, file size, open files and processes;
- a *supervisor* that owns the wall clock and is made a child subreaper (the fork
  server, or a fresh one per job), and a *runner* (its child) that executes the code.
  `os.getppid()` in the code is the supervisor, never the caller; orphans the code
  leaves behind are re-parented to the supervisor, which kills every descendant before
  it reports;
- when the caller is root, the runner drops to an unprivileged uid of its own, so
  the code cannot signal the caller and the process limit counts only this run;
- no network: a network namespace of the supervisor's own (nothing in it leads out), and
  sockets of the internet families only (no unix socket, by path or abstract).

What it does not protect against is written down in docs/sandbox.md.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import secrets
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass

# The child writes its structured payload (one JSON document) to this descriptor.
PAYLOAD_FD = 3

OUTPUT_CAP = 64 * 1024  # bytes of stdout / stderr kept for the caller
PAYLOAD_CAP = 4 * 1024 * 1024  # a larger payload is rejected, not parsed
FILE_CAP = 64 * 1024  # bytes kept per file left in the working directory
MAX_FILES = 32  # files reported from the working directory


# Who supervises a job: a pre-started fork server that forks its runner (no interpreter start
# and one fork per job), or a supervisor spawned fresh (`--grader=spawn`: for comparison, and
# where fork servers cannot run).
GRADERS = ("fork", "spawn")
_grader = os.environ.get("PROJECTED_GRPO_GRADER", "fork")


def use_grader(name: str) -> None:
    global _grader
    if name not in GRADERS:
        raise ValueError(f"grader {name!r} is not one of {', '.join(GRADERS)}")
    _grader = name


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 20.0  # the supervisor kills the whole run after this (> cpu: room under load)
    cpu_seconds: int = 10  # RLIMIT_CPU; catches busy loops even if the wall clock is generous
    memory_bytes: int = 1 << 30  # RLIMIT_AS; a memory bomb gets MemoryError, the host keeps its RAM
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE; stdout/stderr/payload files count too
    open_files: int = 64  # RLIMIT_NOFILE
    processes: int = 32  # RLIMIT_NPROC above what the uid already runs: stops fork bombs


@dataclass
class SandboxResult:
    exit_code: int | None  # None when the runner was killed by a signal or never reported
    signal: int | None  # the signal that ended the runner, if any
    timed_out: bool
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    files: dict[str, bytes]  # regular files left in the working directory (capped)
    payload: object | None  # the parsed JSON payload, or None
    payload_error: str | None  # why the payload was rejected (absent, too big, not JSON, ...)
    error: str | None = None  # the sandbox itself failed to report (e.g. the supervisor was killed)
    landlock_abi: int = 0  # 0: no filesystem/network confinement on this kernel (see docs/sandbox.md)
    netns: bool = False  # it ran in a network namespace of its own (false: the kernel refused one)

    @property
    def ok(self) -> bool:
        """The code ran to completion with exit status 0."""
        return self.exit_code == 0 and not self.timed_out and self.error is None


# The supervisor program, a module of its own (sandbox_supervisor.py: stdlib only), run by
# path as `python -I -S <it> <job fd> <payload fd> <status fd> <PAYLOAD_FD> <wall seconds>`
# (or `--serve`), with the job's source, limits and work dir as JSON in the memory file
# <job fd>. It forks the runner, which alone reads the job and executes the code. The
# trainer never imports it. -I (safe path) also keeps the script's directory, the package,
# off the child's sys.path.
_SUPERVISOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_supervisor.py")

# Seconds past its wall clock the caller gives a supervisor before killing the run itself.
_BACKSTOP = 5

# Where an unprivileged run lives when the caller is root: a uid no account uses,
# different per run, so signals and RLIMIT_NPROC see only this run's processes.
_UID_BASE = 1_500_000_000
_UID_SPAN = 400_000_000


def _read_capped(f, cap: int) -> tuple[bytes, bool]:
    """Read up to `cap` bytes from an open file (from its start), and whether there was more."""
    f.seek(0)
    data = f.read(cap + 1)
    return data[:cap], len(data) > cap


def _collect_files(work: str) -> dict[str, bytes]:
    files = {}
    for entry in sorted(os.scandir(work), key=lambda e: e.name)[:MAX_FILES]:
        if entry.is_file(follow_symlinks=False):
            # O_NOFOLLOW | O_NONBLOCK: a file swapped for a link or FIFO cannot redirect or stall us.
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                with os.fdopen(fd, "rb") as f:
                    files[entry.name] = _read_capped(f, FILE_CAP)[0]
            except OSError:
                pass  # vanished or unreadable: the code's own business, not ours
    return files


def _parse_payload(f) -> tuple[object | None, str | None]:
    raw, too_big = _read_capped(f, PAYLOAD_CAP)
    if not raw:
        return None, "no payload"
    if too_big:
        return None, f"payload exceeds the {PAYLOAD_CAP}-byte cap"
    try:
        return json.loads(raw.decode("utf-8")), None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: bad JSON, 5000-digit ints
        return None, f"payload is not JSON: {e.__class__.__name__}"


def _parse_report(f) -> dict | None:
    """The supervisor's report, or None when it is missing or malformed (the supervisor was killed)."""
    try:
        report = json.loads(_read_capped(f, 4096)[0])
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    types = {"timed_out": bool, "exit_code": (int, type(None)), "signal": (int, type(None)),
             "setup_ok": bool, "landlock_abi": int, "netns": bool}
    if not isinstance(report, dict) or any(not isinstance(report.get(k), t) for k, t in types.items()):
        return None
    return report


def _minimal_env(home: str) -> dict[str, str]:
    # Nothing of the caller's environment (tokens, keys, proxies) reaches the code.
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home}


class SandboxSetupError(RuntimeError):
    """The sandbox could not be set up (before any untrusted code ran): a machine problem."""


# What sandboxed code can do when the kernel leaves out a layer, by the report's key for that layer.
_MISSING_LAYERS = {
    "landlock_abi": "this kernel has no Landlock: sandboxed code can read world-readable files (including dataset "
                    "files) and write to /tmp",
    "netns": "the kernel refused sandboxed code a private network namespace: it can send UDP to any address this "
             "machine reaches (TCP stays behind Landlock's rules, where the kernel has them)",
}
_warned_missing: set[str] = set()


def _warn_missing_layers(report: dict) -> None:
    """One warning per process for each layer the kernel left out."""
    for layer, consequence in _MISSING_LAYERS.items():
        if not report[layer] and layer not in _warned_missing:
            _warned_missing.add(layer)
            warnings.warn(f"{consequence}; see docs/sandbox.md", RuntimeWarning, stacklevel=3)


@functools.cache
def isolation() -> dict:
    """The isolation every job gets on this machine, {"landlock_abi": int, "netns": bool}, from a supervisor
    started only to isolate itself and say so (a run records it in its config.json)."""
    probe = subprocess.run([sys.executable, "-I", "-S", _SUPERVISOR, "--probe"], cwd="/", env=_minimal_env("/"),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        raise SandboxSetupError(f"the sandbox cannot isolate itself here: {probe.stderr.strip()}")
    report = json.loads(probe.stdout)
    _warn_missing_layers(report)
    return report


def _remove_tree(path: str) -> None:
    try:
        shutil.rmtree(path)
    except (OSError, RecursionError):
        # A tree deeper than rmtree's recursion (the code made it), or odd permissions.
        subprocess.run(["rm", "-rf", "--", path], check=False)


def _spawned(handles: dict, work: str, wall: float) -> tuple[int, str, str | None]:
    """A fresh `python -I -S` supervisor for this job. Returns its session id, how it ended, and
    an error when it had to be killed."""
    job_fd, payload_fd, status_fd = (handles[k].fileno() for k in ("job", "payload", "status"))
    argv = [sys.executable, "-I", "-S", _SUPERVISOR, *map(str, (job_fd, payload_fd, status_fd, PAYLOAD_FD, wall))]
    proc = subprocess.Popen(argv, cwd=work, env=_minimal_env(work), stdin=subprocess.DEVNULL,
                            stdout=handles["stdout"], stderr=handles["stderr"],
                            pass_fds=(job_fd, payload_fd, status_fd), start_new_session=True)
    error = None
    # The supervisor enforces the wall clock itself; this is the backstop in case the
    # code managed to kill or stall it. A pidfd wakes us the moment it exits
    # (Popen.wait(timeout) polls with growing sleeps: tens of ms lost per run).
    pidfd = os.pidfd_open(proc.pid)
    try:
        if not select.select([pidfd], [], [], wall + _BACKSTOP)[0]:
            error = "the supervisor did not finish in time and was killed"
            _kill_leftovers(session=proc.pid, uid=None)
    finally:
        os.close(pidfd)
    proc.wait()
    return proc.pid, f"exit {proc.returncode}", error


class ServerDied(RuntimeError):
    """The fork server closed its socket: it died (it never runs model code, so something killed it)."""


class _ForkServer:
    """One pre-started fork server (sandbox_supervisor.py --serve): a `python -I -S` process with
    the bare environment, started once and reused for job after job, one at a time. It supervises
    each job's runner itself: one fork per job."""

    def __init__(self):
        ours, theirs = socket.socketpair()
        self.log = open(os.memfd_create("fork-server-stderr"), "w+b")  # why it died, should it die at start
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", _SUPERVISOR, "--serve", str(theirs.fileno()),
                                      str(PAYLOAD_FD)], cwd="/", env=_minimal_env("/"), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.log,
                                     pass_fds=(theirs.fileno(),), start_new_session=True)
        theirs.close()
        self.sock, self.buffer, self.ready = ours, b"", False

    def send(self, wall: float, fds: list[int]) -> None:
        try:
            socket.send_fds(self.sock, [str(wall).encode()], fds)
        except OSError:
            raise ServerDied from None

    def line(self, deadline: float) -> bytes | None:
        """The server's next line, or None at the deadline; ServerDied when it is gone."""
        while b"\n" not in self.buffer:
            if not select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return None
            try:
                chunk = self.sock.recv(4096)
            except OSError:  # a reset: it died with our job unread
                raise ServerDied from None
            if not chunk:
                raise ServerDied
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def close(self) -> None:
        self.sock.close()  # the server sees the end of its socket and exits
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.wait()
        self.log.close()

    def startup_error(self) -> str:
        with contextlib.suppress(OSError):
            self.proc.kill()  # it may be alive but stuck
        self.proc.wait()
        return _read_capped(self.log, 4096)[0].decode("utf-8", "replace").strip() or f"exit {self.proc.returncode}"


_idle_servers: list[_ForkServer] = []
_servers_lock = threading.Lock()


@atexit.register
def _close_servers() -> None:
    with _servers_lock:
        while _idle_servers:
            _idle_servers.pop().close()


def _forked(handles: dict, wall: float) -> tuple[int | None, str, str | None]:
    """This job run and supervised by an idle fork server (started if none is idle). Returns the
    runner's session id, how it ended, and an error when it was killed or its server died; a
    dead server is replaced, and its job comes back as an error, never lost."""
    with _servers_lock:
        server = _idle_servers.pop() if _idle_servers else None
    fds = [handles[k].fileno() for k in ("job", "stdout", "stderr", "payload", "status")]
    session, keep = None, False
    try:
        try:
            server = server or _ForkServer()
            server.send(wall, fds)
        except ServerDied:  # an idle server that died between jobs: this job never started; a new one runs it
            server.close()
            server = _ForkServer()
            server.send(wall, fds)
        deadline = time.monotonic() + wall + _BACKSTOP
        if not server.ready:
            server.ready = server.line(deadline) == b"ready"
            if not server.ready:
                raise ServerDied
        session = int(server.line(deadline) or 0) or None
        done = server.line(deadline) if session else None
        if done is None:  # stalled: kill the job, then wait for the server to see its child end
            if session:
                _kill_leftovers(session=session, uid=None)
            done = server.line(time.monotonic() + _BACKSTOP)
            keep = done is not None
            return session, "killed", "the supervisor did not finish in time and was killed"
        keep = True
        return session, f"status {int(done.split()[1])}", None
    except ServerDied:
        if not server.ready:  # it never got as far as serving: the server cannot start here
            raise SandboxSetupError(f"the grading server did not start: {server.startup_error()}") from None
        return session, "its server died", "the grading server died while running this job (it is restarted)"
    finally:
        if keep:
            with _servers_lock:
                _idle_servers.append(server)
        else:
            server.close()


def run(source: str, limits: Limits | None = None) -> SandboxResult:
    """Run `source` as `__main__` in a fresh limited child; never raises on hostile code.

    Raises SandboxSetupError only when the sandbox itself cannot start (before any
    of the code runs), e.g. a container where switching uid is not allowed.
    """
    limits = limits or Limits()
    job = tempfile.mkdtemp(prefix="pg_sandbox_")
    try:
        work = os.path.join(job, "work")
        os.mkdir(work, 0o700)
        uid = None
        if os.geteuid() == 0:
            uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
            os.chown(work, uid, uid)
            os.chmod(job, 0o711)  # the dropped uid may pass through to work/
        with contextlib.ExitStack() as stack:
            # Memory files: nothing for the code to find on disk, no inode made per run. We read
            # back through these same handles, which the code cannot redirect.
            handles = {name: stack.enter_context(open(os.memfd_create(name), "w+b"))
                       for name in ("job", "stdout", "stderr", "payload", "status")}
            handles["job"].write(json.dumps({"source": source, "limits": {**limits.__dict__, "uid": uid},
                                             "work": work}).encode())
            handles["job"].flush()
            if _grader == "fork":
                session, ended, error = _forked(handles, limits.wall_seconds)
            else:
                session, ended, error = _spawned(handles, work, limits.wall_seconds)
            report = _parse_report(handles["status"])
            if report is None or error:
                # The supervisor did not finish its own cleanup: sweep what the run left.
                _kill_leftovers(session=session, uid=uid)
            stdout, out_cut = _read_capped(handles["stdout"], OUTPUT_CAP)
            stderr, err_cut = _read_capped(handles["stderr"], OUTPUT_CAP)
            payload, payload_error = _parse_payload(handles["payload"])
        if report is None:
            error = error or f"the supervisor ended without a report ({ended})"
        elif not report["setup_ok"]:
            raise SandboxSetupError(f"sandbox setup failed: {stderr.decode('utf-8', 'replace').strip()}")
        else:
            _warn_missing_layers(report)
        return SandboxResult(
            exit_code=report["exit_code"] if report else None,
            signal=report["signal"] if report else None,
            timed_out=report["timed_out"] if report else False,
            stdout=stdout.decode("utf-8", errors="replace"),
            stderr=stderr.decode("utf-8", errors="replace"),
            stdout_truncated=out_cut,
            stderr_truncated=err_cut,
            files=_collect_files(work),
            payload=payload,
            payload_error=payload_error,
            error=error,
            landlock_abi=report["landlock_abi"] if report else 0,
            netns=report["netns"] if report else False,
        )
    finally:
        _remove_tree(job)


def _kill_leftovers(session: int, uid: int | None) -> None:
    """Kill what is left of a run: its session, and every process of its private uid."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                sid = int(f.read().rsplit(")", 1)[1].split()[3])
            owner = os.stat(f"/proc/{entry}").st_uid
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        if sid == session or (uid is not None and owner == uid):
            try:
                os.kill(int(entry), 9)
            except OSError:
                pass
