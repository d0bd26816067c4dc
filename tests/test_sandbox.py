"""Generated code is hostile until proven otherwise: every attack is contained and scored as a failure."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest

from evomerge.evaluation import data
from evomerge.evaluation.sandbox import Limits, run_program, run_programs

FAST = Limits(timeout_s=3, cpu_seconds=3)


@pytest.fixture
def canary(tmp_path_factory):
    """A directory outside every sandbox whose contents must never change."""
    directory = tmp_path_factory.mktemp("canary")
    (directory / "keep.txt").write_text("precious")
    (directory / "sub").mkdir()
    (directory / "sub" / "deep.txt").write_text("also precious")
    return directory


@pytest.fixture
def listener():
    """A TCP server on loopback that counts connections (there must be none)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    hits = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                connection, _ = server.accept()
                hits.append(1)
                connection.close()
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], hits
    stop.set()
    thread.join(1)
    server.close()


def _snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): p.read_text() if p.is_file() else "<dir>" for p in directory.rglob("*")}


HOSTILE = {
    "infinite_loop": "while True:\n    pass\n",
    "sleep_forever": "import time\ntime.sleep(3600)\n",
    "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
    "thread_bomb": "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,)).start()\n",
    "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'touch {canary}/pwned'])\n",
    "os_system": "import os\nos.system('touch {canary}/pwned')\n",
    "allocate_10gb": "block = bytearray(10 * 1024**3)\n",
    "allocate_slowly": "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024**2))\n",
    "deep_recursion": "def f(n):\n    return f(n + 1)\nf(0)\n",
    "deep_recursion_unlimited": "import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1) + 1\nf(0)\n",
    "write_outside": "open('{canary}/pwned', 'w').write('x')\n",
    "write_outside_os_open": "import os\nfd = os.open('{canary}/pwned', os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')\n",
    "overwrite_existing": "open('{canary}/keep.txt', 'w').write('gone')\n",
    "delete_file": "import os\nos.remove('{canary}/keep.txt')\n",
    "delete_tree": "import shutil\nshutil.rmtree('{canary}')\n",
    "rename_out": "import os\nos.rename('{canary}/keep.txt', 'stolen.txt')\n",
    "read_parent_environment": "import os\nprint(os.environ['EVOMERGE_SECRET'])\n",
    "read_parent_proc_environ": "import os\nprint(open(f'/proc/{{os.getppid()}}/environ').read())\n",
    "socket": "import socket\nsocket.socket().connect(('127.0.0.1', {port}))\n",
    "urllib": "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)\n",
    "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "kill_everything": "import os, signal\nos.kill(-1, signal.SIGKILL)\n",
    "huge_stdout": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
    "huge_file_in_tmp": "with open('big.bin', 'wb') as f:\n    while True:\n        f.write(b'x' * 1024**2)\n",
    "ctypes_libc": "import ctypes\nctypes.CDLL(None).system(b'touch {canary}/pwned')\n",
    "exit_zero_before_tests": "import sys\nsys.exit(0)\n",
    "os_exit_zero": "import os\nos._exit(0)\n",
    "patch_exit_then_fail": "import sys, builtins\nsys.exit = lambda *a: None\nbuiltins.SystemExit = type('X', (Exception,), {{}})\nraise RuntimeError('nope')\n",
    "open_many_files": "files = [open(f'f{{i}}', 'w') for i in range(10000)]\n",
    "raise_limits": "import resource\nresource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_is_contained(name, canary, listener, monkeypatch):
    port, hits = listener
    monkeypatch.setenv("EVOMERGE_SECRET", "hunter2")
    before = _snapshot(canary)
    program = HOSTILE[name].format(canary=canary, port=port)
    start = time.monotonic()
    result = run_program(program, "assert True\n", FAST)
    assert not result.passed, (name, result.status, result.stdout[-300:], result.stderr[-300:])
    assert time.monotonic() - start < FAST.timeout_s + 5
    assert _snapshot(canary) == before, name  # nothing outside the sandbox changed
    assert not hits, "a connection left the sandbox"
    assert "hunter2" not in result.stdout + result.stderr
    assert psutil.Process(os.getpid()).status() != psutil.STATUS_ZOMBIE  # the evaluator is alive and well


# Passes only where the reported layers really hold: the limits are set and the audit hook refuses.
LAYERS_IN_FORCE = """
import os, resource
assert resource.getrlimit(resource.RLIMIT_NOFILE) == (64, 64), resource.getrlimit(resource.RLIMIT_NOFILE)
assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
try:
    os.remove('{canary}/keep.txt')
except PermissionError as exc:
    assert str(exc).startswith('sandbox:'), exc  # refused by the audit hook, not only by file permissions
else:
    raise AssertionError('the audit hook let os.remove through')
"""


def test_sandbox_layers_are_reported_only_when_in_force(canary):
    result = run_program(LAYERS_IN_FORCE.format(canary=canary), "", FAST)
    assert result.passed and result.status == "passed", (result.stdout[-300:], result.stderr[-300:])
    assert {"rlimits", "audit"} <= set(result.layers)
    assert (canary / "keep.txt").exists()


def test_no_stray_processes_after_timeouts():
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    results = run_programs([("import time\ntime.sleep(60)\n", "")] * 3, Limits(timeout_s=1, cpu_seconds=1))
    assert all(r.status == "timeout" for r in results)
    time.sleep(0.2)
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before


def _humaneval_jobs(solution: str) -> list[tuple[str, str]]:
    items = data.pool("humaneval", "search") + data.pool("humaneval", "heldout")
    assert len(items) == 164
    return [(item["prompt"] + solution.format(**item), item["test"] + f"\ncheck({item['entry_point']})\n")
            for item in items]


def test_all_164_canonical_solutions_pass():
    items = data.pool("humaneval", "search") + data.pool("humaneval", "heldout")
    jobs = [(item["prompt"] + item["canonical_solution"], item["test"] + f"\ncheck({item['entry_point']})\n")
            for item in items]
    results = run_programs(jobs, Limits(timeout_s=20, cpu_seconds=20))
    failed = [(item["task_id"], r.status, r.stderr[-200:]) for item, r in zip(items, results) if not r.passed]
    assert not failed


@pytest.mark.parametrize("solution", ["    return None\n", "    pass\n", "    raise NotImplementedError\n"])
def test_wrong_solutions_fail(solution):
    results = run_programs(_humaneval_jobs(solution), Limits(timeout_s=10, cpu_seconds=10))
    # A handful of HumanEval problems accept None/empty; nearly all must fail.
    assert sum(r.passed for r in results) <= 3
