"""Generated code is hostile until proven otherwise: every attack is contained and judged a failure.

Each hostile program below is run through the project's own scorer path (a `Job` judged in the
sandbox) against a problem it does not solve; the test asserts containment (nothing outside
changed, no connection left, no secret printed, the evaluator alive, no process left behind) and
the verdict (failed). The cheats try to make a wrong program pass; the controls show that correct
programs pass, so failures are not the sandbox being broken.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from pathlib import Path

import psutil
import pytest

from evomerge.evaluation import dataset_split, tasklib
from evomerge.evaluation.sandbox import Job, Limits, bubblewrap, run_job, run_jobs

pytestmark = pytest.mark.sandbox

FAST = Limits(timeout_s=4, cpu_seconds=3)
# The problem every hostile program is judged on: it must define solve(x) == 2 * x.
TESTS = "assert solve(2) == 4\nassert solve(-3) == -6\nassert solve(10**20) == 2 * 10**20\n"


def _needs_kernel_isolation():
    if bubblewrap() is None:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail("bubblewrap is missing: CI runs the hostile-program suite under kernel isolation",
                        pytrace=False)
        pytest.skip("needs bubblewrap (apt-get install bubblewrap); CI installs it")


@pytest.fixture
def canary(tmp_path_factory):
    """A directory outside every sandbox whose contents must never change: files, a study database."""
    directory = tmp_path_factory.mktemp("canary")
    (directory / "keep.txt").write_text("precious")
    (directory / "sub").mkdir()
    (directory / "sub" / "deep.txt").write_text("also precious")
    with sqlite3.connect(directory / "study.db") as db:
        db.execute("create table secrets (value text)")
        db.execute("insert into secrets values ('study-password-hunter2')")
    return directory


@pytest.fixture
def listeners(tmp_path_factory):
    """A TCP server on loopback and a Unix socket server (path and abstract) that count connections."""
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    path = str(tmp_path_factory.mktemp("sock") / "evaluator.sock")
    unix.bind(path)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0evomerge-test-{os.getpid()}")
    servers = [tcp, unix, abstract]
    hits, stop = [], threading.Event()

    def accept(server):
        server.listen(8)
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
                hits.append(1)
                connection.close()
            except OSError:
                pass

    threads = [threading.Thread(target=accept, args=(s,), daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    yield {"port": tcp.getsockname()[1], "unix": path, "abstract": f"evomerge-test-{os.getpid()}"}, hits
    stop.set()
    for thread in threads:
        thread.join(1)
    for server in servers:
        server.close()


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>" for p in directory.rglob("*")}


LIBC = "import ctypes\nlibc = __import__('sys').modules['__main__'].libc\nlibc.syscall.restype = ctypes.c_long\n"

HOSTILE = {
    # resources
    "infinite_loop": "while True:\n    pass\n",
    "sleep_forever": "import time\ntime.sleep(3600)\n",
    "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
    "thread_bomb": "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,)).start()\n",
    "allocate_10gb": "block = bytearray(10 * 1024**3)\n",
    "allocate_slowly": "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024**2))\n",
    "deep_recursion": "def f(n):\n    return f(n + 1)\nf(0)\n",
    "deep_recursion_unlimited": "import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1) + 1\nf(0)\n",
    "huge_stdout": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
    "huge_file": "with open('big.bin', 'wb') as f:\n    while True:\n        f.write(b'x' * 1024**2)\n",
    "many_files_fill_disk": "i = 0\nwhile True:\n    open(f'f{{i}}', 'wb').write(b'x' * (8 << 20))\n    i += 1\n",
    "open_many_files": "files = [open(f'f{{i}}', 'w') for i in range(10000)]\n",
    "raise_limits": "import resource\nresource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n",
    # the filesystem outside
    "write_outside": "open('{canary}/pwned', 'w').write('x')\n",
    "write_outside_os_open": "import os\nfd = os.open('{canary}/pwned', os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')\n",
    "overwrite_existing": "open('{canary}/keep.txt', 'w').write('gone')\n",
    "delete_file": "import os\nos.remove('{canary}/keep.txt')\n",
    "delete_tree": "import shutil\nshutil.rmtree('{canary}')\n",
    "rename_out": "import os\nos.rename('{canary}/keep.txt', 'stolen.txt')\n",
    "raw_unlink": LIBC + "libc.syscall(87, b'{canary}/keep.txt')\ndef solve(x):\n    return 0\n",
    # secrets and study databases
    "read_etc_shadow": "print(open('/etc/shadow').read())\n",
    "read_study_db": "print(open('{canary}/study.db', 'rb').read())\n",
    "read_study_db_raw": LIBC + "fd = libc.syscall(2, b'{canary}/study.db', 0)\nimport os\nprint(os.read(fd, 100000))\n",
    "read_parent_environment": "import os\nprint(os.environ['EVOMERGE_SECRET'])\n",
    "read_proc_environ": "import os\nprint(open(f'/proc/{{os.getppid()}}/environ').read())\n",
    "proc_double_slash": "import os\nprint(open(f'//proc/{{os.getppid()}}/environ').read())\n",
    "proc_dotdot": "import os\nprint(open(f'/proc/self/../{{os.getppid()}}/environ').read())\n",
    "proc_evaluator_cmdline": "print(open('/proc/{evaluator}/cmdline').read())\n",
    "proc_scan_all": ("import os\nfor p in os.listdir('/proc'):\n    try:\n        print(open(f'/proc/{{p}}/environ').read())\n"
                     "    except Exception:\n        pass\nraise SystemExit(1)\n"),
    # processes
    "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'touch {canary}/pwned'])\n",
    "os_system": "import os\nos.system('touch {canary}/pwned')\n",
    "ctypes_libc": "import ctypes\nctypes.CDLL(None).system(b'touch {canary}/pwned')\n",
    "posixsubprocess": ("import _posixsubprocess, os\nr, w = os.pipe()\n"
                        "_posixsubprocess.fork_exec([b'/bin/sh', b'-c', b'touch {canary}/pwned'], [b'/bin/sh'], True, (), "
                        "None, None, -1, -1, -1, -1, -1, -1, r, w, False, False, -1, None, None, None, -1, None, False)\n"
                        "import time\ntime.sleep(1)\n"),
    "raw_fork_exec": LIBC + ("pid = libc.syscall(57)\nif pid == 0:\n    import os\n    os.execv('/bin/sh', ['sh', '-c', "
                             "'touch {canary}/pwned'])\nimport time\ntime.sleep(1)\n"),
    "setsid_daemon": LIBC + ("import os, time\nif libc.syscall(57) == 0:\n    os.setsid()\n    time.sleep(2)\n"
                             "    open('{canary}/late', 'w').write('x')\n    os._exit(0)\n"
                             "def solve(x):\n    return 0\n"),
    # signals
    "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "kill_everything": "import os, signal\nos.kill(-1, signal.SIGKILL)\n",
    "kill_evaluator_by_pid": LIBC + "libc.syscall(62, {evaluator}, 9)\nlibc.syscall(62, -1, 9)\n",
    "pidfd_evaluator": LIBC + "fd = libc.syscall(434, {evaluator}, 0)\nlibc.syscall(424, fd, 9, 0, 0)\nfd = libc.syscall(434, 1, 0)\nlibc.syscall(424, fd, 9, 0, 0)\n",
    "setuid_root": LIBC + "print(libc.syscall(105, 0))\nprint(open('/etc/shadow').read())\n",
    # sockets
    "socket": "import socket\nsocket.socket().connect(('127.0.0.1', {port}))\n",
    "urllib": "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)\n",
    "raw_socket_syscall": LIBC + ("import struct\ns = libc.syscall(41, 2, 1, 0)\n"
                                  "addr = struct.pack('<HH4s8x', 2, __import__('socket').htons({port}), bytes([127, 0, 0, 1]))\n"
                                  "print(libc.syscall(42, s, addr, 16))\n"),
    "unix_socket_path": LIBC + ("path = b'{unix}'\nimport struct\ns = libc.syscall(41, 1, 1, 0)\n"
                                "addr = struct.pack('<H108s', 1, path)\nprint(libc.syscall(42, s, addr, 110))\n"),
    "unix_socket_abstract": LIBC + ("import struct\ns = libc.syscall(41, 1, 1, 0)\n"
                                    "addr = struct.pack('<H108s', 1, b'\\0{abstract}')\n"
                                    "print(libc.syscall(42, s, addr, 2 + 1 + len(b'{abstract}')))\n"),
    # cheats: make a wrong program pass
    "exit_zero_early": "import sys\nsys.exit(0)\n",
    "os_exit_zero": "import os\nos._exit(0)\n",
    "print_marker_then_raw_exit": LIBC + "print('__evomerge_completed__', flush=True)\nlibc.syscall(231, 0)\n",
    "patch_exit_then_fail": "import sys, builtins\nsys.exit = lambda *a: None\nbuiltins.SystemExit = type('X', (Exception,), {{}})\nraise RuntimeError('nope')\n",
    "always_equal": ("class Yes:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n"
                     "def solve(x):\n    return Yes()\n"),
    "int_subclass_equal": "class Int(int):\n    def __eq__(self, other):\n        return True\ndef solve(x):\n    return Int(0)\n",
    "frame_rewrites_tests": ("import sys\ndef solve(x):\n    frame = sys._getframe(1)\n    while frame:\n"
                             "        frame.f_globals['solve'] = lambda y: 2 * y\n        frame.f_globals['__builtins__'] = {{}}\n"
                             "        frame = frame.f_back\n    return 0\n"),
    "read_tests_from_disk": ("import os\nfound = []\nfor root, dirs, files in os.walk('/'):\n    for f in files:\n"
                             "        try:\n            if 'solve(10**20)' in open(os.path.join(root, f), errors='ignore').read():\n"
                             "                found.append(f)\n        except Exception:\n            pass\n"
                             "def solve(x):\n    return len(found) * 1000\n"),
    # the reply pipe is the child's fd in argv: replies written ahead with the answers the tests want
    "forge_reply_on_the_pipe": ("import sys, json, os\nfd = int(sys.argv[4])\n"
                                "def frame(m):\n    d = json.dumps(m).encode()\n"
                                "    os.write(fd, len(d).to_bytes(4, 'big') + d)\n"
                                "frame({{'ready': True, 'entry': True}})\n"
                                "for v in (4, -6, 2 * 10**20):\n    frame({{'value': v}})\n"
                                "def solve(x):\n    return 0\n"),
    # the judge's request pipe filled from inside (reopened through /proc), then silence: the judge
    # must not wait on its write
    "fill_the_request_pipe": ("import os, sys, time\nfd = os.open('/proc/self/fd/' + sys.argv[3], os.O_WRONLY | os.O_NONBLOCK)\n"
                              "try:\n    while True:\n        os.write(fd, b'x' * 65536)\nexcept BlockingIOError:\n    pass\n"
                              "def solve(x):\n    time.sleep(60)\n"),
    # the file the evaluator reads after the run, made a FIFO or a link to an endless device
    "layers_as_fifo": ("import os\nos.remove('layers.txt') if os.path.exists('layers.txt') else None\n"
                       "os.mkfifo('layers.txt')\ndef solve(x):\n    return 0\n"),
    "layers_as_link_to_dev_zero": ("import os\nos.remove('layers.txt') if os.path.exists('layers.txt') else None\n"
                                   "os.symlink('/dev/zero', 'layers.txt')\ndef solve(x):\n    return 0\n"),
    # a reply whose decoding would cost the judge: tens of thousands of colliding ints in a set, or
    # a reply near the pipe protocol's old 16 MiB
    "colliding_ints_reply": ("import sys\nM = sys.hash_info.modulus\n"
                             "def solve(x):\n    return set(i * M for i in range(60000))\n"),
    "huge_reply": ("def solve(x):\n    return 'x' * (15 << 20)\n"),
    # 3,000 nested folders in the scratch: the cleanup must not raise and lose the batch
    "deep_folders": ("import os\np = 'd'\nfor _ in range(3000):\n    os.mkdir(p)\n    os.chdir(p)\n"
                     "def solve(x):\n    return 0\n"),
    "patch_the_encoder": ("import sys\nmain = sys.modules['__main__']\nmain.encode = lambda v: {{'list': []}}\n"
                          "def solve(x):\n    return 0\n"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_is_contained_and_fails(name, canary, listeners, monkeypatch):
    _needs_kernel_isolation()
    addresses, hits = listeners
    monkeypatch.setenv("EVOMERGE_SECRET", "hunter2")
    before = _snapshot(canary)
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    program = HOSTILE[name].format(canary=canary, evaluator=os.getpid(), **addresses)
    start = time.monotonic()
    result = run_job(Job(program, TESTS, entry_point="solve"), FAST)
    assert not result.passed, (name, result.status, result.reason, result.stdout[-300:], result.stderr[-300:])
    assert time.monotonic() - start < FAST.timeout_s + 5
    time.sleep(2.5 if name == "setsid_daemon" else 0.2)  # a daemon would write after its sandbox is gone
    assert _snapshot(canary) == before, name  # nothing outside the sandbox changed
    assert not hits, "a connection left the sandbox"
    output = result.stdout + result.stderr
    assert "hunter2" not in output and "study-password" not in output and "root:" not in output
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= children  # nothing left running
    assert psutil.Process(os.getpid()).status() != psutil.STATUS_ZOMBIE  # the evaluator is alive


def test_there_are_forty_hostile_programs_in_every_class():
    assert len(HOSTILE) >= 40


def test_a_correct_program_passes_and_a_wrong_one_fails():
    """The controls: the verdict comes from the judge's tests, and it tells right from wrong."""
    _needs_kernel_isolation()
    assert run_job(Job("def solve(x):\n    return 2 * x\n", TESTS, entry_point="solve"), FAST).passed
    wrong = run_job(Job("def solve(x):\n    return x + 2\n", TESTS, entry_point="solve"), FAST)
    assert not wrong.passed and wrong.status == "failed" and "tests failed: AssertionError" in wrong.reason
    tuple_back = run_job(Job("def solve(x):\n    return (x, [x], {{x: 'a'}}, {{x}})\n".replace("{{", "{").replace("}}", "}"),
                             "assert solve(1) == (1, [1], {1: 'a'}, {1})\n", entry_point="solve"), FAST)
    assert tuple_back.passed, tuple_back.reason  # plain data of every builtin kind crosses intact


# Passes only where the reported layers really hold: the limits are set and the audit hook refuses.
LAYERS_IN_FORCE = """
import os, resource
assert resource.getrlimit(resource.RLIMIT_NOFILE) == (64, 64), resource.getrlimit(resource.RLIMIT_NOFILE)
assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
assert os.getuid() != 0 and sorted(os.listdir('/proc'))[:1] == ['1']  # unprivileged, in its own PID namespace
assert not os.path.exists('/etc/shadow') and not os.path.exists('/home')
try:
    os.remove('/usr/lib/os-release')
except PermissionError as exc:
    assert str(exc).startswith('sandbox:'), exc  # refused by the audit hook, not only by file permissions
else:
    raise AssertionError('the audit hook let os.remove through')
"""


def test_sandbox_layers_are_reported_only_when_in_force():
    _needs_kernel_isolation()
    result = run_job(Job(LAYERS_IN_FORCE), FAST)
    assert result.passed and result.status == "passed", (result.reason, result.stderr[-300:])
    assert {"rlimits", "audit", "bubblewrap"} <= set(result.layers)


def test_without_process_isolation_generated_code_is_refused_unless_opted_in(monkeypatch):
    from evomerge.errors import EvomergeError
    from evomerge.evaluation import sandbox

    monkeypatch.setattr(sandbox, "bubblewrap", lambda: None)
    monkeypatch.delenv(sandbox.MODE_ENV, raising=False)
    with pytest.raises(EvomergeError, match="bubblewrap .* is not usable here; install it"):
        run_job(Job("def solve(x):\n    return 2 * x\n", TESTS, entry_point="solve"), FAST)
    assert sandbox.describe()["isolation"] == "none: refused"
    monkeypatch.setenv(sandbox.MODE_ENV, "weak")  # the user's explicit choice: the inner layers alone
    assert run_job(Job("def solve(x):\n    return 2 * x\n", TESTS, entry_point="solve"), FAST).passed
    assert "process isolation" in sandbox.describe()["missing"][0]


def test_no_stray_processes_after_timeouts():
    _needs_kernel_isolation()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    results = run_jobs([Job("import time\ntime.sleep(60)\n")] * 3, Limits(timeout_s=1, cpu_seconds=1))
    assert all(r.status == "timeout" for r in results)
    time.sleep(0.2)
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before


def _humaneval_jobs(solution: str | None = None) -> list[Job]:
    items = dataset_split("humaneval", "test")
    assert len(items) == 164
    return [tasklib.humaneval_job(item, item["canonical_solution"] if solution is None else solution)
            for item in items]


def test_all_164_canonical_solutions_pass():
    _needs_kernel_isolation()
    jobs = _humaneval_jobs()
    results = run_jobs(jobs, Limits(timeout_s=20, cpu_seconds=20))
    failed = [(job.entry_point, r.status, r.reason[:200]) for job, r in zip(jobs, results) if not r.passed]
    assert not failed


@pytest.mark.parametrize("solution", ["    return None\n", "    pass\n", "    raise NotImplementedError\n"])
def test_wrong_solutions_fail(solution):
    _needs_kernel_isolation()
    results = run_jobs(_humaneval_jobs(solution), Limits(timeout_s=10, cpu_seconds=10))
    # A handful of HumanEval problems accept None/empty; nearly all must fail.
    assert sum(r.passed for r in results) <= 3


SYSTEM_PYTHON = "/usr/bin/python3"


def test_hostile_programs_are_contained_when_the_evaluator_is_an_ordinary_user(listeners, monkeypatch):
    """The same suite with the evaluator running as `nobody` (unprivileged user namespaces), as on a
    researcher's GPU server: a forked evaluator drops to uid 65534 and runs every hostile program,
    with a system Python for the sandbox (this one lives under /root, which nobody may read)."""
    import json
    import shutil
    import tempfile

    _needs_kernel_isolation()
    if os.geteuid() != 0:
        pytest.skip("the evaluator is already an ordinary user: the suite above ran as one")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"needs a system Python at {SYSTEM_PYTHON} for the sandbox of an unprivileged evaluator")
    from evomerge.evaluation import sandbox

    addresses, hits = listeners
    canary = Path(tempfile.mkdtemp(prefix="evomerge-canary-"))  # reachable by nobody outside a sandbox
    try:
        (canary / "keep.txt").write_text("precious")
        (canary / "sub").mkdir()
        (canary / "sub" / "deep.txt").write_text("also precious")
        for path in [canary, *canary.rglob("*")]:
            path.chmod(0o777 if path.is_dir() else 0o666)
        before = _snapshot(canary)
        monkeypatch.setenv("EVOMERGE_SECRET", "hunter2")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the unprivileged evaluator
            try:
                os.close(read)
                os.environ[sandbox.PYTHON_ENV] = SYSTEM_PYTHON
                sandbox.bubblewrap.cache_clear()
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                jobs = [Job(HOSTILE[name].format(canary=canary, evaluator=os.getpid(), **addresses), TESTS,
                            entry_point="solve") for name in sorted(HOSTILE)]
                results = run_jobs(jobs, FAST)
                control = run_job(Job("def solve(x):\n    return 2 * x\n", TESTS, entry_point="solve"), FAST)
                report = {"uid": os.getuid(), "control": control.passed, "layers": list(control.layers),
                          "results": [[name, r.passed, r.stdout + r.stderr] for name, r in zip(sorted(HOSTILE), results)]}
                os.write(write, json.dumps(report).encode())
            finally:
                os._exit(0)
        os.close(write)
        chunks = []
        while chunk := os.read(read, 1 << 20):
            chunks.append(chunk)
        os.close(read)
        os.waitpid(pid, 0)
        report = json.loads(b"".join(chunks))
        time.sleep(2.5)  # a daemon would write after its sandbox is gone
        assert report["uid"] == 65534 and report["control"] and "bubblewrap" in report["layers"]
        assert [name for name, passed, _ in report["results"] if passed] == []
        assert [name for name, _, output in report["results"] if "hunter2" in output or "root:" in output] == []
        assert _snapshot(canary) == before and not hits
    finally:
        shutil.rmtree(canary, ignore_errors=True)


# Limits the kernel enforces across the whole program, whoever starts the evaluator (as root,
# RLIMIT_NPROC binds nothing and SysV shared memory lies outside RLIMIT_AS). Each program measures
# how far it got and returns it; the judge's test passes only when the limit held, so `passed`
# here means "contained" and a program that got further fails the assertion below.
KERNEL_LIMITS = {
    # plain threads, each sleeping: the per-user RLIMIT_NPROC of 64 does not hold as root
    "threads": ("import threading, time\nstarted = 0\n"
                "for _ in range(400):\n    try:\n        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
                "        started += 1\n    except Exception:\n        break\n"
                "def solve(x):\n    return started\n", "assert solve(0) <= 64, solve(0)\n"),
    # raw forks, each child paused
    "forks": ("import os, signal\nmade = 0\n"
              "for _ in range(200):\n    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
              "    if pid == 0:\n        signal.pause()\n        os._exit(0)\n    made += 1\n"
              "def solve(x):\n    return made\n", "assert solve(0) <= 64, solve(0)\n"),
    # SysV shared memory, touched page by page and detached: outside every process's address space
    "sysv_shared_memory": (
        LIBC + "SHMGET, SHMAT, SHMDT = {shm}\nheld = 0\nfor _ in range(12):\n"
        "    seg = libc.syscall(SHMGET, 0, 256 << 20, 0o1600)\n    if seg < 0:\n        break\n"
        "    addr = libc.syscall(SHMAT, seg, None, 0)\n    if addr < 0:\n        break\n"
        "    ctypes.memset(addr, 1, 256 << 20)\n    libc.syscall(SHMDT, ctypes.c_void_p(addr))\n    held += 256 << 20\n"
        "def solve(x):\n    return held\n", "assert solve(0) < (2 << 30), solve(0)\n"),
    # bytes written into its folder and /tmp, file after file (each under file_bytes)
    "scratch_bytes": (
        "import os\nwritten = 0\nfor folder in ('.', '/tmp'):\n    for i in range(64):\n        try:\n"
        "            with open(os.path.join(folder, f'fill{i}'), 'wb') as f:\n"
        "                for _ in range(15):\n                    f.write(b'x' * (1 << 20))\n"
        "                    written += 1 << 20\n        except OSError:\n            break\n"
        "def solve(x):\n    return written\n", "assert solve(0) <= 2 * (64 << 20), solve(0)\n"),
}


@pytest.mark.parametrize("name", sorted(KERNEL_LIMITS))
def test_kernel_limits_hold_across_the_whole_program(name):
    _needs_kernel_isolation()
    from evomerge.evaluation.cgroups import Cgroups

    if Cgroups.available() is None and name in ("threads", "forks", "sysv_shared_memory") and os.geteuid() == 0:
        pytest.skip("no cgroup can be made here: as root these limits have no kernel layer (docs/security.md)")
    program, tests = KERNEL_LIMITS[name]
    if name == "sysv_shared_memory":
        if SHM is None:
            pytest.skip("SysV syscall numbers known for x86-64 and arm64 only")
        program = program.replace("{shm}", repr(SHM))
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    result = run_job(Job(program, tests, entry_point="solve"), Limits(timeout_s=20, cpu_seconds=15))
    if name == "sysv_shared_memory":  # killed by the memory cgroup on the way, or stopped: either holds
        assert result.passed or result.returncode in (137, -9) or result.status == "signal:SIGKILL", result.reason
    else:
        assert result.passed, (name, result.status, result.reason, result.stderr[-300:])
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= children


SHM = {"x86_64": (29, 30, 67), "aarch64": (194, 196, 197)}.get(os.uname().machine)
SYS_ADD_KEY, SYS_KEYCTL = {"x86_64": (248, 250), "aarch64": (217, 219)}.get(os.uname().machine, (None, None))


def test_each_program_has_a_fresh_session_keyring():
    """The evaluator's session keyring holds a secret; a program cannot find it, and a key a program
    plants is seen neither by the evaluator nor by the next program."""
    _needs_kernel_isolation()
    import ctypes

    if SYS_ADD_KEY is None:
        pytest.skip("keyctl numbers known for x86-64 and arm64 only")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.syscall(SYS_KEYCTL, 1, None) < 0:  # the test's own anonymous session keyring
        pytest.skip("keyrings are not available here (seccomp)")
    secret = b"evomerge-keyring-secret"
    assert libc.syscall(SYS_ADD_KEY, b"user", b"evomerge-test", secret, len(secret), -3) >= 0
    find = (LIBC + "import os\n"
            "def look(name):\n    key = libc.syscall({keyctl}, 10, -3, b'user', name, 0)\n"
            "    if key < 0:\n        return 'none'\n    buf = ctypes.create_string_buffer(256)\n"
            "    n = libc.syscall({keyctl}, 11, key, buf, 256)\n    return buf.raw[:max(n, 0)].decode()\n"
            "def solve(x):\n    return look(x.encode())\n").replace("{keyctl}", str(SYS_KEYCTL))
    plant = find + ("key = libc.syscall({add}, b'user', b'evomerge-planted', b'planted', 7, -3)\n"
                    "assert key >= 0, os.strerror(ctypes.get_errno())\n").replace("{add}", str(SYS_ADD_KEY))
    looked = run_job(Job(find, "assert solve('evomerge-test') == 'none', solve('evomerge-test')\n",
                         entry_point="solve"), FAST)
    assert looked.passed, looked.reason
    planted = run_job(Job(plant, "assert solve('evomerge-planted') == 'planted'\n", entry_point="solve"), FAST)
    assert planted.passed, planted.reason  # it could plant in its own keyring...
    after = run_job(Job(find, "assert solve('evomerge-planted') == 'none', solve('evomerge-planted')\n",
                        entry_point="solve"), FAST)
    assert after.passed, after.reason  # ...which the next program does not share
    assert libc.syscall(SYS_KEYCTL, 10, -3, b"user", b"evomerge-planted", 0) < 0  # nor the evaluator
    assert "keyring" in looked.layers


# Searches every file the sandbox can see for what the judge knows: HumanEval's data (tests and
# canonical solutions, installed with the package). Returns what it found; passes only when nothing.
FIND_THE_TESTS = """
import os, gzip
found = []
for root, dirs, files in os.walk('/'):
    if root.startswith(('/proc', '/sys', '/dev')):
        dirs[:] = []
        continue
    for name in files:
        path = os.path.join(root, name)
        if 'humaneval' in name.lower() or 'HumanEval' in root:
            found.append(path)
            continue
        try:
            if os.path.getsize(path) < 50_000_000 and name.endswith(('.gz', '.jsonl', '.json')):
                data = open(path, 'rb').read()
                if name.endswith('.gz'):
                    data = gzip.decompress(data)
                if b'canonical_solution' in data:
                    found.append(path)
        except Exception:
            pass
def solve(x):
    return found
"""


def test_nothing_the_judge_knows_is_readable_from_a_normal_install(tmp_path):
    """`pip install .` (not -e) puts HumanEval's tests and solutions in site-packages: a program
    searching every file it can see finds none of them."""
    _needs_kernel_isolation()
    import shutil
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(repo, source, ignore=shutil.ignore_patterns(".git", "results", "build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "wheel"), str(source)], check=True, cwd=tmp_path, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    wheel, = (tmp_path / "wheel").glob("evomerge-*.whl")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   cwd=tmp_path, capture_output=True)
    script = ("import json, evomerge\n"
              "from evomerge.evaluation.sandbox import Job, Limits, run_job\n"
              f"program = {FIND_THE_TESTS!r}\n"
              "r = run_job(Job(program, \"assert solve(0) == [], solve(0)\\n\", entry_point='solve'), "
              "Limits(timeout_s=60, cpu_seconds=50))\n"
              "print(json.dumps({'package': evomerge.__file__, 'passed': r.passed, 'reason': r.reason}))\n")
    out = subprocess.run([str(python), "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": ""})
    report = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert Path(report["package"]).is_relative_to(venv), report  # the installed copy, not the checkout
    assert (Path(report["package"]).parent / "tasks" / "humaneval" / "HumanEval.jsonl.gz").exists()
    assert report["passed"], report["reason"]


def test_a_bubblewrap_without_sized_tmpfs_still_judges(monkeypatch):
    """bubblewrap before 0.7 (Ubuntu 22.04) has no --size: the program's folder is a bind mount then."""
    _needs_kernel_isolation()
    from evomerge.evaluation import sandbox

    monkeypatch.setattr(sandbox, "_sized_tmpfs", lambda: False)
    right = run_job(Job("def solve(x):\n    return 2 * x\n", TESTS, entry_point="solve"), FAST)
    assert right.passed and "tmpfs" not in right.layers and "bubblewrap" in right.layers, right.reason
    assert not run_job(Job("def solve(x):\n    return x\n", TESTS, entry_point="solve"), FAST).passed


def test_a_reply_is_decoded_within_its_limits():
    """Under the 1 MiB size limit a reply can still be costly to decode (colliding keys hash slowly):
    more than 10,000 items in one set, 100,000 values or 100 levels are refused."""
    from evomerge.evaluation import sandbox_child as child
    from evomerge.evaluation.sandbox import REPLY_DECODE_LIMITS

    for value in (set(range(10_001)), [[0] * 50] * 2001, [[[[]]]]):
        encoded = child.encode(value)
        assert child.decode(encoded) == value  # the judge's own calls: no limit
    for value, message in ((set(range(10_001)), "more than 10000 items"), ([[0] * 50] * 2001, "too large"),
                           (_nested(101), "too large or too deep")):
        with pytest.raises(ValueError, match=message):
            child.decode(child.encode(value), REPLY_DECODE_LIMITS)
    _needs_kernel_isolation()
    refused = run_job(Job("def solve(x):\n    return set(range(20_000))\n", "assert len(solve(0)) == 20_000\n",
                          entry_point="solve"), FAST)
    assert not refused.passed and "not plain data" in refused.reason, refused.reason


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value
