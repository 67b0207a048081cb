"""The sandbox runs hostile code and the host is unharmed; each test states one attack."""

import ast
import ctypes
import importlib.util
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import process_alive

from projected_grpo import rewards, sandbox
from projected_grpo.templates import clean_completion

# Every test here runs on both the fork-server path and the plain spawn path.
pytestmark = pytest.mark.usefixtures("each_grader")

FAST = sandbox.Limits(wall_seconds=3, cpu_seconds=3)


@pytest.fixture(autouse=True)
def host_unharmed():
    cwd, handler = os.getcwd(), signal.getsignal(signal.SIGINT)
    yield
    assert os.getcwd() == cwd
    assert signal.getsignal(signal.SIGINT) is handler


def test_plain_run_reports_stdout_files_and_payload():
    r = sandbox.run("import os\nprint('hi')\nopen('out.txt', 'w').write('x')\n"
                    f"os.write({sandbox.PAYLOAD_FD}, b'{{\"a\": [1, 2]}}')\n")
    assert r.ok and r.stdout == "hi\n"
    assert r.files == {"out.txt": b"x"}
    assert r.payload == {"a": [1, 2]} and r.payload_error is None


def test_syntax_error_and_exception_are_results_not_raises():
    r = sandbox.run("def broken(:\n")
    assert r.exit_code == 1 and "SyntaxError" in r.stderr
    r = sandbox.run("raise ValueError('boom')")
    assert r.exit_code == 1 and "boom" in r.stderr and not r.ok


def test_forged_or_garbage_payload_is_rejected_not_parsed_blindly():
    r = sandbox.run(f"import os\nos.write({sandbox.PAYLOAD_FD}, b'{{not json')")
    assert r.payload is None and "not JSON" in r.payload_error
    r = sandbox.run("print(1)")
    assert r.payload is None and r.payload_error == "no payload"


def test_infinite_loop_times_out_quickly():
    start = time.monotonic()
    r = sandbox.run("while True:\n    pass\n", sandbox.Limits(wall_seconds=1, cpu_seconds=5))
    assert r.timed_out and not r.ok and r.signal == signal.SIGKILL
    assert time.monotonic() - start < 4


def test_memory_bomb_fails_inside_the_child():
    r = sandbox.run("x = bytearray(8 * 1024 ** 3)\nprint('allocated')", FAST)
    assert not r.ok and "allocated" not in r.stdout and "MemoryError" in r.stderr


def test_fork_bomb_is_contained_and_cleaned_up():
    code = ("import os, time\nprint(os.getpid(), flush=True)\n"
            "for _ in range(200):\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
            "time.sleep(30)\n")
    start = time.monotonic()
    r = sandbox.run(code, sandbox.Limits(wall_seconds=1, cpu_seconds=5))
    assert r.timed_out and time.monotonic() - start < 8
    first = int(r.stdout.split()[0])
    assert not process_alive(first)


def test_huge_file_is_stopped_by_the_file_size_limit():
    r = sandbox.run("with open('big.bin', 'wb') as f:\n    f.write(b'0' * (64 << 20))\n",
                    sandbox.Limits(file_bytes=1 << 20))
    assert not r.ok and "File too large" in r.stderr
    assert len(r.files["big.bin"]) <= sandbox.FILE_CAP


def test_100mb_of_stdout_is_capped_and_flagged():
    r = sandbox.run("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(100):\n    sys.stdout.write(chunk)\n")
    assert r.stdout_truncated and len(r.stdout) == sandbox.OUTPUT_CAP
    assert not r.ok  # the file-size limit stops it long before 100 MB


def test_non_utf8_stdout_is_decoded_with_replacement():
    r = sandbox.run("import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe done')\n")
    assert r.ok and r.stdout.startswith("ok ") and "\ufffd" in r.stdout


def test_deep_recursion_crashes_only_the_child():
    r = sandbox.run("import sys\nsys.setrecursionlimit(10 ** 7)\ndef f(n):\n    return f(n + 1)\nf(0)\n", FAST)
    assert not r.ok


def test_environment_holds_no_secrets(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-456")
    r = sandbox.run("import os\nprint(dict(os.environ))")
    assert r.ok
    assert "secret" not in r.stdout and "HF_TOKEN" not in r.stdout


def test_killing_the_parent_leaves_the_callerprocess_alive():
    r = sandbox.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nimport time\ntime.sleep(5)\n", FAST)
    assert not r.ok
    assert process_alive(os.getpid())


@pytest.mark.skipif(os.geteuid() != 0, reason="kill(-1) reaches every process of a non-root caller's own uid")
def test_kill_everything_reaches_only_the_sandbox_when_root():
    r = sandbox.run("import os, signal\nos.kill(-1, signal.SIGKILL)\n", FAST)
    assert r.error is None  # the supervisor survived to report
    assert process_alive(os.getpid())


def test_daemon_left_behind_is_killed():
    code = ("import os, sys, time\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        print(os.getpid(), flush=True)\n        time.sleep(60)\n    os._exit(0)\n"
            "time.sleep(0.3)\n")
    r = sandbox.run(code, FAST)
    assert r.ok
    daemon = int(r.stdout.split()[0])
    assert not process_alive(daemon)


def test_grandchild_cannot_write_after_the_run():
    code = ("import os, time\n"
            "if os.fork() == 0:\n    time.sleep(0.5)\n    open('result.txt', 'w').write('PASS')\n    os._exit(0)\n")
    r = sandbox.run(code, FAST)
    assert r.ok and "result.txt" not in r.files


def test_each_run_gets_a_fresh_directory():
    first = sandbox.run("open('left.txt', 'w').write('x')\nimport os\nprint(os.getcwd())")
    second = sandbox.run("import os\nprint(sorted(os.listdir('.')), os.getcwd())")
    assert "left.txt" not in second.stdout
    assert not os.path.exists(first.stdout.strip())


def test_hostile_payload_and_deep_tree_do_not_make_run_raise():
    r = sandbox.run(f"import os\nos.write({sandbox.PAYLOAD_FD}, b'[' + b'1' * 5000 + b']')")
    assert r.payload is None and "not JSON" in r.payload_error
    r = sandbox.run("import os\nprint(os.getcwd(), flush=True)\nfor _ in range(3000):\n    os.mkdir('d')\n"
                    "    os.chdir('d')\n", FAST)
    assert r.error is None
    assert not os.path.exists(os.path.dirname(r.stdout.strip()))  # the job dir is gone


DATASET = os.path.join(os.path.dirname(sandbox.__file__), "data", "builtin_problems.jsonl")


def test_code_is_confined_to_its_directory():
    probe = sandbox.run("print('probe')")
    if probe.landlock_abi == 0:
        pytest.skip("this kernel has no Landlock; confinement is documented as unavailable")
    attempts = {
        "dataset": f"open({DATASET!r}).read()",
        "tmp": "open('/tmp/pg_leak_test', 'w').write('x')",
        "shm": "open('/dev/shm/pg_leak_test', 'w').write('x')",
        "tcp": "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)",
    }
    for name, code in attempts.items():
        r = sandbox.run(code, FAST)
        assert not r.ok and "PermissionError" in r.stderr, name
    assert not os.path.exists("/tmp/pg_leak_test")
    r = sandbox.run("import json, random, datetime, fractions\nopen('ok.txt', 'w').write('fine')\nprint('ok')")
    assert r.ok and r.files == {"ok.txt": b"fine"}


def test_supervisor_is_a_stdlib_module_run_by_path(monkeypatch):
    spec = importlib.util.find_spec("projected_grpo.sandbox_supervisor")  # finds the file, runs nothing
    assert os.path.dirname(spec.origin) == os.path.dirname(sandbox.__file__)
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(isinstance(n, ast.ImportFrom) for n in ast.walk(tree))  # no relative or package imports
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
    # Importing it does nothing: top-level code would read sys.argv[1] and fail here.
    imported_ok = subprocess.run([sys.executable, "-c", "import projected_grpo.sandbox_supervisor"],
                                 capture_output=True, text=True, timeout=60)
    assert imported_ok.returncode == 0 and imported_ok.stdout == imported_ok.stderr == ""
    started = []
    popen = subprocess.Popen

    def spy(argv, *args, **kwargs):
        started.append(list(argv))
        return popen(argv, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", spy)
    sandbox._close_servers()  # so the fork path starts its server here, where the spy sees it
    # Run by path with -I, the package's directory is not on the code's sys.path (nor is the package).
    r = sandbox.run("import importlib.util as u\n"
                    "print([u.find_spec(m) is None for m in ('sandbox_supervisor', 'projected_grpo')])")
    assert r.ok and r.stdout == "[True, True]\n"
    argv = next(a for a in started if a[0] == sys.executable)
    assert argv[1:3] == ["-I", "-S"] and "-c" not in argv
    assert os.path.isabs(argv[3]) and os.path.samefile(argv[3], spec.origin)


# ----------------------------------------------------------------------------- the network
# Each attack is a completion that tries it at import time, then solves its problem. Graded through the real
# grader it still solves it, and its target receives nothing; the same code run by an ordinary subprocess
# reaches the target, so it is the sandbox that stopped it.

def _probe(attack: str) -> str:
    """`attack` as a completion runs it: any OSError it raises ignored, so the solution after it still runs."""
    body = "".join(f"    {line}\n" for line in attack.splitlines())
    return f"import socket\ntry:\n{body}except OSError:\n    pass\n"


def _attacking(problem, attack: str) -> str:
    """The problem's clean completion with the attack's probe run before the solution."""
    return clean_completion(problem).replace("```python\n", "```python\n" + _probe(attack), 1)


def _reached(target: socket.socket) -> bool:
    """Whether a datagram or a connection reached `target` within 1 s (then taken, so the next check starts clean)."""
    if not select.select([target], [], [], 1.0)[0]:
        return False
    if target.type == socket.SOCK_DGRAM:
        target.recv(64)
    else:
        target.accept()[0].close()
    return True


@pytest.fixture
def world_dir():
    """A directory anyone may search: a socket in it that anyone may write is open to anyone by file permissions
    (Landlock does not check a connect to a unix socket)."""
    path = tempfile.mkdtemp(prefix="pg_net_test_")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def _target(kind: str, directory: str) -> tuple[socket.socket, str]:
    """A socket the test listens on, and the attack that aims at it."""
    if kind == "udp":
        target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        target.bind(("127.0.0.1", 0))
        return target, f"socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', {target.getsockname()!r})"
    if kind == "tcp":
        target = socket.create_server(("127.0.0.1", 0))
        return target, f"socket.create_connection({target.getsockname()!r}, timeout=1)"
    target = socket.socket(socket.AF_UNIX)
    if kind == "unix_path":
        address = os.path.join(directory, "listener")
        target.bind(address)
        os.chmod(address, 0o777)
    else:
        address = b"\0projected_grpo_test_" + secrets.token_hex(8).encode()
        target.bind(address)
    target.listen()
    return target, f"socket.socket(socket.AF_UNIX).connect({address!r})"


@pytest.mark.parametrize("kind", ["udp", "tcp", "unix_path", "unix_abstract"])
def test_graded_code_reaches_no_socket_of_the_host(kind, problems, world_dir):
    if kind in ("udp", "tcp") and not sandbox.isolation()["netns"]:
        pytest.skip("the kernel refused a network namespace: UDP is open, TCP rests on Landlock (tested above)")
    problem = problems[0]
    target, attack = _target(kind, world_dir)
    with target:
        completion = _attacking(problem, attack)
        graded = rewards.compute_reward(completion, problem)
        assert graded.gt_correct, graded  # the attack failed quietly and the solution still graded
        assert not _reached(target)
        outside = subprocess.run([sys.executable, "-c", _probe(attack)], timeout=30)
        assert outside.returncode == 0 and _reached(target)


FAMILIES = """
import ctypes, errno, socket
def refused(family, kind=socket.SOCK_STREAM):
    try:
        socket.socket(family, kind).close()
        return False
    except PermissionError:
        return True
libc = ctypes.CDLL(None, use_errno=True)
io_uring = libc.syscall(425, 1, ctypes.create_string_buffer(120)) == -1 and ctypes.get_errno() == errno.EACCES
print(refused(socket.AF_UNIX), refused(socket.AF_VSOCK), refused(socket.AF_NETLINK, socket.SOCK_RAW), io_uring,
      refused(socket.AF_INET), refused(socket.AF_INET6), len(socket.socketpair()))
"""


def test_graded_code_makes_internet_sockets_only():
    # A unix socket, a virtual machine's line to its host (vsock), netlink and io_uring (which makes sockets
    # where the filter cannot see) are refused; internet sockets, which the namespace confines, and a socket
    # pair, which reaches nothing, are not.
    r = sandbox.run(FAMILIES)
    assert r.ok and r.stdout == "True True True True False False 2\n", r


def test_a_name_lookup_works_or_fails_cleanly_and_never_hangs(problems):
    start = time.monotonic()
    graded = rewards.compute_reward(_attacking(problems[0], "socket.getaddrinfo('localhost', 80)"), problems[0])
    assert graded.gt_correct and time.monotonic() - start < 10, graded
    r = sandbox.run("import socket\ntry:\n    print(socket.getaddrinfo('localhost', 80)[0][4])\n"
                    "except socket.gaierror as e:\n    print('gaierror', e.errno)\n", FAST)
    assert r.ok and r.stdout.startswith(("('127.0.0.1', 80)", "('::1', 80", "gaierror")), r


def test_each_job_says_whether_it_had_a_network_namespace_of_its_own():
    r = sandbox.run("import os\nprint(os.readlink('/proc/self/ns/net'))")
    assert r.ok and r.netns == sandbox.isolation()["netns"]
    assert r.landlock_abi == sandbox.isolation()["landlock_abi"]
    if not r.netns:
        pytest.skip("the kernel refused a network namespace (the next test covers that case)")
    assert r.stdout.strip() != os.readlink("/proc/self/ns/net")


REFUSED = """
import json, warnings
from projected_grpo import sandbox
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    runs = [sandbox.run("import socket\\nsocket.socket(socket.AF_UNIX)") for _ in range(2)]
    isolation = sandbox.isolation()
print(json.dumps({"stderr": [r.stderr for r in runs], "netns": [r.netns for r in runs],
                  "isolation": isolation["netns"], "warnings": [str(w.message) for w in caught]}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping a capability from the bounding set takes root")
def test_a_kernel_that_refuses_the_namespace_still_grades_and_warns_once():
    # Root without CAP_SYS_ADMIN: unshare(CLONE_NEWNET) is refused, as where a seccomp profile forbids it.
    libc = ctypes.CDLL(None, use_errno=True)
    child = subprocess.run([sys.executable, "-c", REFUSED], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PROJECTED_GRPO_GRADER": sandbox._grader},
                           preexec_fn=lambda: libc.prctl(24, 21, 0, 0, 0))  # PR_CAPBSET_DROP, CAP_SYS_ADMIN
    assert child.returncode == 0, child.stderr
    seen = json.loads(child.stdout)
    assert seen["netns"] == [False, False] and seen["isolation"] is False
    assert all("PermissionError" in stderr for stderr in seen["stderr"])  # the socket filter does not need it
    (warning,) = seen["warnings"]
    assert "private network namespace" in warning and "UDP" in warning


def test_require_netns_stops_a_run_before_anything_where_the_kernel_refuses(monkeypatch, tmp_path, capsys):
    from projected_grpo import train

    monkeypatch.setattr(sandbox, "isolation", lambda: {"landlock_abi": 7, "netns": False})
    assert train.main(["smoke", "--require_netns=true", f"--out_dir={tmp_path}"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: --require_netns: ") and "--require_netns=false" in line
    assert not any(tmp_path.iterdir())  # not even the run's lock file
