"""The sandbox's supervisor: the program `sandbox.run` starts to run and watch each job.

`sandbox.run` runs this file by path; the trainer never imports it. Started as

    python -I -S .../sandbox_supervisor.py <job fd> <payload fd> <status fd> <code payload fd> <wall seconds>

(`--grader=spawn`) it supervises one job. <job fd> holds the job as JSON (its source, its
limits and its work dir); stdout and stderr are the job's. The supervisor makes itself a
child subreaper, leaves the host's network (`isolate_network`) and forks the *runner*,
which reads the job, confines itself (own process group, Landlock, unprivileged uid,
rlimits), says on a pipe that setup is done, and alone executes the code, with <payload fd>
moved to <code payload fd> (sandbox.PAYLOAD_FD) for the code's payload. The supervisor owns
the wall clock, kills every descendant the code left, and writes one JSON report to
<status fd>. It never reads the job itself.

Started as `... sandbox_supervisor.py --serve <socket fd> <code payload fd>` it is
instead a fork server (`--grader=fork`, `sandbox.use_grader`): a long-lived supervisor
that never runs model code. It leaves the host's network once, for all its runners, and
says `ready` once set up; then for each job the trainer sends the wall seconds and five
descriptors over the socket (the job, stdout, stderr, payload, status); the server forks
that job's runner (in a session of its own), says its pid, supervises it exactly as above
and says when it is done. The server never reads a job, so no job's text is in the memory
the next runner is forked from; nothing a job does reaches the server or the next job, and
no interpreter start is paid per job.

Started as `... sandbox_supervisor.py --probe` it isolates itself as a supervisor would and
prints what it got, `{"landlock_abi": ..., "netns": ...}` (`sandbox.isolation`).

Standard library only, and nothing from projected_grpo: under -I -S the package is
not importable, and the code under test must not get the trainer's package. Importing
this module runs nothing.
"""

import atexit
import builtins
import contextlib
import ctypes
import errno
import fcntl
import gc
import itertools
import json
import os
import resource
import select
import signal
import socket
import struct
import sys


def count_processes(uid):
    """Processes of `uid` in our user namespace: what RLIMIT_NPROC counts against our limit (a user
    namespace counts its own; `private_network` may have made one)."""
    ours = os.stat("/proc/self/ns/user").st_ino
    n = 0
    for p in os.listdir("/proc"):
        try:
            n += (p.isdigit() and os.stat("/proc/" + p).st_uid == uid
                  and os.stat(f"/proc/{p}/ns/user").st_ino == ours)
        except OSError:
            pass
    return n


def landlock_abi(libc):
    """The Landlock ABI this kernel offers; 0: none."""
    return max(0, libc.syscall(444, None, 0, 1))  # landlock_create_ruleset(NULL, 0, VERSION)


def landlock(libc, rules):
    # Filesystem: read-only beneath the stdlib, everything beneath work/, nothing
    # else (no data files, no /tmp or /dev/shm channels between runs). Network:
    # no TCP bind/connect. Scope: no signals or abstract sockets out of the run.
    # `rules` are (O_PATH fd, "read" | "all" | "file") pairs opened while we could.
    abi = landlock_abi(libc)
    if abi < 1:
        return 0
    fs = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
    net = 3 if abi >= 4 else 0
    scoped = 3 if abi >= 6 else 0
    attr = struct.pack("QQQ", fs, net, scoped) if abi >= 6 else struct.pack("QQ", fs, net)
    ruleset = libc.syscall(444, attr, len(attr), 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    access = {"read": (1 << 2) | (1 << 3), "all": fs, "file": (1 << 1) | (1 << 2)}  # READ_FILE, READ_DIR, WRITE_FILE
    for fd, kind in rules:
        if libc.syscall(445, ruleset, 1, struct.pack("=Qi", access[kind], fd), 0) < 0:  # PATH_BENEATH
            raise OSError(ctypes.get_errno(), "landlock_add_rule")
        os.close(fd)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS, required to restrict ourselves unprivileged
    if libc.syscall(446, ruleset, 0) < 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    os.close(ruleset)
    return abi


CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
LINUX_CAPABILITY_VERSION_3 = 0x20080522


def private_network(libc):
    """Move this process, and every runner it will fork, into a network namespace of its own: one
    loopback, down, and no other interface, so no datagram or connection leaves it (not even to this
    machine's own addresses), and no abstract unix socket of the host's is in it. Root needs only the
    network namespace. Anyone else gets it inside a user namespace that maps just their own uid and
    gid, so ids, rlimits and Landlock work as before, and then gives up the capabilities that
    namespace lent (they would let the code configure its network namespace). Returns False when
    the kernel refuses (user namespaces disabled, a seccomp profile that forbids unshare): the
    report says so, and grading goes on without this layer."""
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(CLONE_NEWNET if uid == 0 else CLONE_NEWUSER | CLONE_NEWNET) != 0:
        return False
    if uid != 0:
        for name, line in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            fd = os.open(f"/proc/self/{name}", os.O_WRONLY)
            try:
                os.write(fd, line.encode())  # one write: the kernel takes a map whole or not at all
            finally:
                os.close(fd)
        no_capabilities = bytes(24)  # effective, permitted, inheritable: two 32-bit words each
        if libc.capset(struct.pack("Ii", LINUX_CAPABILITY_VERSION_3, 0), no_capabilities) != 0:
            raise OSError(ctypes.get_errno(), "capset")
    return True


# For the seccomp filter, per machine: its AUDIT_ARCH_* value and the number of socket(). io_uring_setup
# has one number everywhere.
SECCOMP_MACHINES = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}
IO_URING_SETUP = 425
X32_SYSCALL_BIT = 0x40000000
BPF_LD_ABS, BPF_JEQ, BPF_JGE, BPF_RET = 0x20, 0x15, 0x35, 0x06  # with BPF_W / BPF_K
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000


def internet_sockets_only(libc):
    """A seccomp filter on this process and all it forks: socket() makes only internet sockets, which the
    network namespace and Landlock confine, and fails with EACCES for any other family. A unix socket
    above all: neither the namespace nor Landlock stops a connect to one by its path. Also families that
    may lead out of the namespace (AF_VSOCK to a virtual machine's host). socketpair() still works: it
    reaches nothing. Refused as well: io_uring (its operations create sockets out of the filter's
    sight) and calls of another ABI (x32, 32-bit), whose numbers the filter would not recognise."""
    machine = os.uname().machine
    if machine not in SECCOMP_MACHINES:
        raise RuntimeError(f"no seccomp filter is written for {machine} machines: add its numbers to "
                           f"SECCOMP_MACHINES")
    arch, socket_call = SECCOMP_MACHINES[machine]
    deny, allow = 9, 10  # the last two instructions
    program = [  # (code, where to go if true, if false, operand); None: on to the next instruction
        (BPF_LD_ABS, None, None, 4),  # 0: seccomp_data.arch
        (BPF_JEQ, None, deny, arch),  # 1
        (BPF_LD_ABS, None, None, 0),  # 2: seccomp_data.nr
        (BPF_JGE, deny, None, X32_SYSCALL_BIT),  # 3
        (BPF_JEQ, deny, None, IO_URING_SETUP),  # 4
        (BPF_JEQ, None, allow, socket_call),  # 5
        (BPF_LD_ABS, None, None, 16),  # 6: socket()'s family, the low half of seccomp_data.args[0]
        (BPF_JEQ, allow, None, socket.AF_INET),  # 7
        (BPF_JEQ, allow, deny, socket.AF_INET6),  # 8
        (BPF_RET, None, None, SECCOMP_RET_ERRNO | errno.EACCES),  # 9: deny
        (BPF_RET, None, None, SECCOMP_RET_ALLOW),  # 10: allow
    ]

    def skip(here, to):  # a BPF jump counts the instructions it skips
        return 0 if to is None else to - here - 1

    instructions = ctypes.create_string_buffer(b"".join(
        struct.pack("HBBI", code, skip(i, if_true), skip(i, if_false), k)
        for i, (code, if_true, if_false, k) in enumerate(program)))
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS, required to filter ourselves unprivileged
    if libc.prctl(22, 2, struct.pack("HP", len(program), ctypes.addressof(instructions)), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp")  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


def isolate_network(libc):
    """The network layers every runner this process forks inherits; returns whether it has a network
    namespace of its own."""
    netns = private_network(libc)
    internet_sockets_only(libc)
    return netns


def relocate(path, moved):
    """`path` rewritten beneath the /proc/self/fd directory that stands for its stdlib directory."""
    for old, new in moved.items():
        if path == old or path.startswith(old + os.sep):
            return new + path[len(old):]
    return path


def stdlib_through_fds():
    """When root (each runner drops to a uid of its own): the stdlib may sit under a directory that
    uid cannot search (/root), so open its directories now and import through /proc/self/fd from
    here on. Done once per supervisor (the fork server's runners inherit it). Returns the fds."""
    if os.geteuid() != 0:
        return set()
    # O_PATH: shared by every runner and kept by the server, so nothing a runner does to one (a lock,
    # a read position) may outlive its job.
    moved = {p: high_fd(os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in sys.path if os.path.isdir(p)}
    fds = set(moved.values())
    moved = {p: f"/proc/self/fd/{fd}" for p, fd in moved.items()}
    sys.path[:] = list(moved.values())
    for module in list(sys.modules.values()):  # packages already imported, e.g. collections
        if isinstance(getattr(module, "__path__", None), list):
            module.__path__[:] = [relocate(p, moved) for p in module.__path__]
    sys.path_importer_cache.clear()
    return fds


def enter_sandbox(libc, work, lim, stdlib_fds, code_payload_fd, ready_fd):
    os.chdir(work)
    rules = [(os.open(p, os.O_PATH), "read") for p in sys.path if os.path.isdir(p)]
    rules += [(os.open(work, os.O_PATH), "all"), (os.open("/dev/null", os.O_PATH), "file")]
    keep = {0, 1, 2, code_payload_fd, ready_fd} | stdlib_fds
    uid = lim["uid"]
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, so /proc/self/fd (the stdlib's way in) is ours again
    nproc = lim["processes"] + (0 if uid is not None else count_processes(os.getuid()))  # before Landlock hides /proc
    abi = landlock(libc, rules)
    for res, value in ((resource.RLIMIT_CPU, lim["cpu_seconds"]),
                       (resource.RLIMIT_AS, lim["memory_bytes"]),
                       (resource.RLIMIT_FSIZE, lim["file_bytes"]),
                       (resource.RLIMIT_NOFILE, lim["open_files"]),
                       (resource.RLIMIT_NPROC, nproc),
                       (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))
    os.write(ready_fd, b"%d" % abi)  # setup done: from here on, only the code's own doing
    # Close everything else we hold (the status fd, the supervisor's or the server's own).
    edges = sorted(keep - {ready_fd}) + [1 << 16]
    for low, high in itertools.pairwise(edges):
        os.closerange(low + 1, high)


def children():
    me = str(os.getpid())
    kids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        kids.append(int(p))
            except (OSError, IndexError):
                pass
    return kids


def has_children():
    try:
        return os.waitpid(-1, os.WNOHANG) is not None
    except ChildProcessError:
        return False


def kill_descendants(runner):
    # Orphans keep coming back to us (subreaper) until none is left alive.
    while has_children():
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


def supervise(runner, ready_r, status_fd, wall_seconds, netns):
    """Wait for the runner (wall clock), kill what it left, and write the report to `status_fd`
    (`netns`: whether it ran in a network namespace of its own). Returns the runner's wait status."""
    pidfd = os.pidfd_open(runner)
    timed_out = not select.select([pidfd], [], [], wall_seconds)[0]
    os.close(pidfd)
    if timed_out:
        os.kill(runner, signal.SIGKILL)
    _, status = os.waitpid(runner, 0)
    kill_descendants(runner)
    ready = os.read(ready_r, 16)
    os.close(ready_r)
    report = {"timed_out": timed_out,
              "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
              "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
              "setup_ok": bool(ready),
              "landlock_abi": int(ready) if ready.isdigit() else 0,
              "netns": netns}
    os.write(status_fd, json.dumps(report).encode())
    return status


def run_code(source):
    """Run the code as __main__ and end the process as the interpreter ends a script: status 0, a
    SystemExit's code, or 1 after the traceback; then non-daemon threads, atexit, flushed output.
    The runner is a fork deep inside the supervisor's (or the fork server's) stack: nothing the
    code raises may unwind into it."""
    # Only the runner reaches this line, confined already; the training process never runs this file.
    try:
        scope = {"__name__": "__main__", "__builtins__": builtins}
        exec(compile(source, "main.py", "exec"), scope)  # safe: only in the confined runner, never the trainer
        status = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:  # sys.exit("message"): printed, status 1
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        status = 1
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status & 0xFF)


def load_libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: the code's orphans come back to us
    return libc


def read_job(job_fd):
    """The job the trainer wrote: {"source", "limits", "work"}, read by the runner alone. The descriptor is
    closed before the code runs."""
    data = os.pread(job_fd, os.fstat(job_fd).st_size, 0)
    os.close(job_fd)
    return json.loads(data)


def start_runner(libc, job_fd, stdlib_fds, out, err, payload_fd, code_payload_fd, own_session):
    """Fork the runner, which reads the job, confines itself and runs the job's source. `own_session`: a
    session of its own, whose id (the runner's pid) the trainer sweeps by (the fork server's runners); else a
    process group in the spawned supervisor's session. Returns its pid and the pipe on which it says setup
    is done."""
    ready_r, ready_w = os.pipe()
    runner = os.fork()
    if runner == 0:
        try:
            os.dup2(out, 1)
            os.dup2(err, 2)
            os.close(ready_r)
            ready_w = high_fd(ready_w)  # it or the job may hold the code's payload fd number: moved or read first
            job = read_job(job_fd)
            os.dup2(payload_fd, code_payload_fd)
            os.setsid() if own_session else os.setpgid(0, 0)
            os.environ["HOME"] = os.environ["TMPDIR"] = job["work"]  # as a fresh start would have them
            if "random" in sys.modules:
                sys.modules["random"].seed()  # not the server's state, shared by every runner forked from it
            enter_sandbox(libc, job["work"], job["limits"], stdlib_fds, code_payload_fd, ready_w)
        except BaseException as e:
            os.write(2, f"sandbox setup failed: {e!r}\n".encode())
            os._exit(111)
        run_code(job["source"])
    os.close(ready_w)
    return runner, ready_r


# What the problems' set-up code imports (typing alone is a noticeable part of a short job: docs/performance.md):
# imported once by the fork server, so each job's runner finds them loaded. Each runner gets its own copy-on-write copy;
# what one job does to them never reaches the server or another job.
PRELOAD = ("typing", "collections", "functools", "itertools", "heapq", "bisect", "math", "random", "string",
           "datetime", "operator", "re", "json")


# Trusted text the fork server compiles once: a process's first compile sets up the compiler's
# own state, which every runner would otherwise redo.
WARM_UP = """
class A:
    def f(self, xs: list[int], *a, k=1, **kw) -> int:
        try:
            with open(0) as g:
                return sum(x for x in xs if x) + len([y for y in g]) + {1: 2}[k] + len({*a} | kw.keys())
        except (ValueError, KeyError) as e:
            raise RuntimeError(f"{e!r}") from e
        finally:
            lambda: None
"""


def serve(sock_fd, code_payload_fd):
    """The fork server: one job at a time, each in a forked runner that the server supervises."""
    for name in PRELOAD:
        __import__(name)
    libc, stdlib_fds = load_libc(), stdlib_through_fds()
    netns = isolate_network(libc)
    compile(WARM_UP, "<warm-up>", "exec")
    gc.freeze()  # what the server holds now is never scanned by a runner's collector (no copy-on-write)
    server = socket.socket(fileno=sock_fd)
    server.sendall(b"ready\n")  # the trainer tells a server that cannot start from one a job killed
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(server, 64, 5)
        except OSError:
            return
        if not message:  # the trainer is gone
            return
        job_fd, out, err, payload_fd, status_fd = (high_fd(fd) for fd in fds)
        runner, ready_r = start_runner(libc, job_fd, stdlib_fds, out, err, payload_fd, code_payload_fd,
                                       own_session=True)
        try:
            for fd in (job_fd, out, err, payload_fd):
                os.close(fd)
            server.sendall(b"%d\n" % runner)
            status = supervise(runner, ready_r, status_fd, float(message), netns)
        except BaseException:  # the server is going down: never leave a runner unsupervised
            for kill in (os.killpg, os.kill):
                with contextlib.suppress(OSError):
                    kill(runner, signal.SIGKILL)
            raise
        os.close(status_fd)
        server.sendall(b"done %d\n" % status)


def high_fd(fd):
    """`fd` moved to the lowest free number from 10 up. A descriptor opened or received here takes the
    lowest free number, which may be the one the runner dup's the code's payload onto."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


def main():
    if sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), int(sys.argv[3]))
        return
    if sys.argv[1] == "--probe":
        libc = load_libc()
        print(json.dumps({"landlock_abi": landlock_abi(libc), "netns": isolate_network(libc)}))
        return
    job_fd, payload_fd, status_fd, code_payload_fd = (int(a) for a in sys.argv[1:5])
    libc, stdlib_fds = load_libc(), stdlib_through_fds()
    netns = isolate_network(libc)
    runner, ready_r = start_runner(libc, job_fd, stdlib_fds, 1, 2, payload_fd, code_payload_fd, own_session=False)
    supervise(runner, ready_r, status_fd, float(sys.argv[5]), netns)


if __name__ == "__main__":
    main()
