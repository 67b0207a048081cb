"""Run untrusted source code in a short-lived, limited child process.

Knows nothing about problems or grading modes: it takes a source string and gives
back what the run did (exit status, capped stdout/stderr, files left in its working
directory, and one structured payload). Every run gets

- a fresh temporary working directory, removed afterwards;
- an interpreter started with `-I -S` (no user site, no PYTHON* variables, no cwd on
  sys.path) and an environment holding nothing from the parent but a bare PATH;
- rlimits on CPU time, address space, file size, open files and processes;
- two processes: a *supervisor* that owns the wall clock and is made a child
  subreaper, and a *runner* (its child) that executes the code. `os.getppid()` in
  the code is the supervisor, never the caller; orphans the code leaves behind are
  re-parented to the supervisor, which kills every descendant before it reports;
- when the caller is root, the runner drops to an unprivileged uid of its own, so
  the code cannot signal the caller and the process limit counts only this run.

What it does not protect against is written down in docs/sandbox.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

# The child writes its structured payload (one JSON document) to this descriptor.
PAYLOAD_FD = 3
_STATUS_FD = 4  # supervisor -> caller: how the runner ended; the code never holds it

OUTPUT_CAP = 64 * 1024  # bytes of stdout / stderr kept for the caller
PAYLOAD_CAP = 4 * 1024 * 1024  # a larger payload is rejected, not parsed
FILE_CAP = 64 * 1024  # bytes kept per file left in the working directory
MAX_FILES = 32  # files reported from the working directory


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 10.0  # the supervisor kills the whole run after this
    cpu_seconds: int = 10  # RLIMIT_CPU; catches busy loops even if the wall clock is generous
    memory_bytes: int = 1 << 30  # RLIMIT_AS; a memory bomb gets MemoryError, the host keeps its RAM
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE; stdout/stderr/payload files count too
    open_files: int = 64  # RLIMIT_NOFILE
    processes: int = 32  # RLIMIT_NPROC above what the uid already runs: stops fork bombs


@dataclass
class Job:
    source: str
    limits: Limits = field(default_factory=Limits)


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

    @property
    def ok(self) -> bool:
        """The code ran to completion with exit status 0."""
        return self.exit_code == 0 and not self.timed_out and self.error is None


# The supervisor program, run as `python -I -S -c _SUPERVISOR <job dir> <payload fd>
# <status fd>`, with the job's source in <job dir>/io/main.py and the limits in
# <job dir>/io/limits.json. It forks the runner, which alone executes the code.
_SUPERVISOR = r"""
import ctypes, json, os, resource, select, signal, sys, time

job, payload_fd, status_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(os.path.join(job, "io", "limits.json")) as f:
    lim = json.load(f)
with open(os.path.join(job, "io", "main.py"), encoding="utf-8") as f:
    source = f.read()
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: the code's orphans come back to us

def count_processes(uid):
    n = 0
    for p in os.listdir("/proc"):
        try:
            n += p.isdigit() and os.stat("/proc/" + p).st_uid == uid
        except OSError:
            pass
    return n

def enter_sandbox():
    os.setpgid(0, 0)
    os.dup2(payload_fd, PAYLOAD_FD)
    os.closerange(PAYLOAD_FD + 1, 1 << 16)  # drops the status fd and our copies
    os.chdir(os.path.join(job, "work"))
    uid = lim["uid"]
    if uid is not None:
        # The stdlib may sit under a directory the new uid cannot search (/root);
        # directory fds opened now keep it importable through /proc/self/fd.
        moved = {p: "/proc/self/fd/%d" % os.open(p, os.O_RDONLY | os.O_DIRECTORY)
                 for p in sys.path if os.path.isdir(p)}
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, so /proc/self/fd is ours again
        def relocate(path):
            for old, new in moved.items():
                if path == old or path.startswith(old + os.sep):
                    return new + path[len(old):]
            return path
        sys.path[:] = list(moved.values())
        for module in list(sys.modules.values()):  # packages already imported, e.g. collections
            if isinstance(getattr(module, "__path__", None), list):
                module.__path__[:] = [relocate(p) for p in module.__path__]
        sys.path_importer_cache.clear()
    nproc = lim["processes"] + (0 if uid is not None else count_processes(os.getuid()))
    for res, value in ((resource.RLIMIT_CPU, lim["cpu_seconds"]),
                       (resource.RLIMIT_AS, lim["memory_bytes"]),
                       (resource.RLIMIT_FSIZE, lim["file_bytes"]),
                       (resource.RLIMIT_NOFILE, lim["open_files"]),
                       (resource.RLIMIT_NPROC, nproc),
                       (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))

PAYLOAD_FD = __PAYLOAD_FD__
runner = os.fork()
if runner == 0:
    try:
        enter_sandbox()
    except BaseException as e:
        os.write(2, ("sandbox setup failed: %r\n" % (e,)).encode())
        os._exit(111)
    exec(compile(source, "main.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

def children():
    me = str(os.getpid())
    kids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open("/proc/%s/stat" % p) as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        kids.append(int(p))
            except (OSError, IndexError):
                pass
    return kids

def kill_descendants():
    # Orphans keep coming back to us (subreaper) until none is left alive.
    while True:
        try:
            os.killpg(runner, signal.SIGKILL)
        except OSError:
            pass
        kids = children()
        if not kids:
            return
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in kids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass

pidfd = os.pidfd_open(runner)
timed_out = not select.select([pidfd], [], [], lim["wall_seconds"])[0]
if timed_out:
    os.kill(runner, signal.SIGKILL)
_, status = os.waitpid(runner, 0)
kill_descendants()
report = {"timed_out": timed_out,
          "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
          "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}
os.write(status_fd, json.dumps(report).encode())
""".replace("__PAYLOAD_FD__", str(PAYLOAD_FD))

# Where an unprivileged run lives when the caller is root: a uid no account uses,
# different per run, so signals and RLIMIT_NPROC see only this run's processes.
_UID_BASE = 1_500_000_000
_UID_SPAN = 400_000_000


def _read_capped(path: str, cap: int) -> tuple[bytes, bool]:
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    return data[:cap], len(data) > cap


def _collect_files(work: str) -> dict[str, bytes]:
    files = {}
    for entry in sorted(os.scandir(work), key=lambda e: e.name)[:MAX_FILES]:
        if entry.is_file(follow_symlinks=False):
            try:
                files[entry.name] = _read_capped(entry.path, FILE_CAP)[0]
            except OSError:
                pass  # vanished or unreadable: the code's own business, not ours
    return files


def _parse_payload(path: str) -> tuple[object | None, str | None]:
    size = os.path.getsize(path)
    if size == 0:
        return None, "no payload"
    if size > PAYLOAD_CAP:
        return None, f"payload of {size} bytes exceeds the {PAYLOAD_CAP}-byte cap"
    raw, _ = _read_capped(path, PAYLOAD_CAP)
    try:
        return json.loads(raw.decode("utf-8")), None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        return None, f"payload is not JSON: {e.__class__.__name__}"


def _minimal_env(home: str) -> dict[str, str]:
    # Nothing of the caller's environment (tokens, keys, proxies) reaches the code.
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home}


def run(source: str, limits: Limits | None = None) -> SandboxResult:
    """Run `source` as `__main__` in a fresh limited child; never raises on hostile code."""
    limits = limits or Limits()
    job = tempfile.mkdtemp(prefix="pg_sandbox_")
    try:
        io_dir, work = os.path.join(job, "io"), os.path.join(job, "work")
        os.mkdir(io_dir, 0o700)
        os.mkdir(work, 0o700)
        uid = None
        if os.geteuid() == 0:
            uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
            os.chown(work, uid, uid)
            os.chmod(job, 0o711)  # the dropped uid may pass through to work/, not list io/
        with open(os.path.join(io_dir, "main.py"), "w", encoding="utf-8") as f:
            f.write(source)
        with open(os.path.join(io_dir, "limits.json"), "w") as f:
            json.dump({**limits.__dict__, "uid": uid}, f)
        paths = {name: os.path.join(io_dir, name) for name in ("stdout", "stderr", "payload", "status")}
        with contextlib.ExitStack() as stack:  # the child holds its own copies once started
            handles = {name: stack.enter_context(open(path, "wb")) for name, path in paths.items()}
            payload_fd, status_fd = handles["payload"].fileno(), handles["status"].fileno()
            argv = [sys.executable, "-I", "-S", "-c", _SUPERVISOR, job, str(payload_fd), str(status_fd)]
            proc = subprocess.Popen(argv, cwd=work, env=_minimal_env(work), stdin=subprocess.DEVNULL,
                                    stdout=handles["stdout"], stderr=handles["stderr"],
                                    pass_fds=(payload_fd, status_fd), start_new_session=True)
        error = None
        try:
            # The supervisor enforces the wall clock itself; this is the backstop in
            # case the code managed to kill or stall it.
            proc.wait(timeout=limits.wall_seconds + 5)
        except subprocess.TimeoutExpired:
            error = "the supervisor did not finish in time and was killed"
        _kill_leftovers(session=proc.pid, uid=uid)
        proc.wait()
        try:
            report = json.loads(_read_capped(paths["status"], 4096)[0])
        except (json.JSONDecodeError, UnicodeDecodeError):
            report = None
            error = error or f"the supervisor ended without a report (exit {proc.returncode})"
        stdout, out_cut = _read_capped(paths["stdout"], OUTPUT_CAP)
        stderr, err_cut = _read_capped(paths["stderr"], OUTPUT_CAP)
        payload, payload_error = _parse_payload(paths["payload"])
        return SandboxResult(
            exit_code=report["exit_code"] if report else None,
            signal=report["signal"] if report else None,
            timed_out=bool(report["timed_out"]) if report else False,
            stdout=stdout.decode("utf-8", errors="replace"),
            stderr=stderr.decode("utf-8", errors="replace"),
            stdout_truncated=out_cut,
            stderr_truncated=err_cut,
            files=_collect_files(work),
            payload=payload,
            payload_error=payload_error,
            error=error,
        )
    finally:
        shutil.rmtree(job, ignore_errors=True)


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


def run_many(jobs: list[Job], workers: int | None = None) -> list[SandboxResult]:
    """Run jobs in parallel (threads only wait on children, so the GIL is free); input order kept.

    The default is two workers per core: a run spends part of its time starting
    processes and waiting on them, so one per core leaves the cores idle (measured
    on 2 cores: 15 completions/s with 2 workers, 25/s with 4, no gain beyond).
    """
    workers = workers or 2 * (os.cpu_count() or 1)
    if workers == 1 or len(jobs) <= 1:
        return [run(j.source, j.limits) for j in jobs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda j: run(j.source, j.limits), jobs))
