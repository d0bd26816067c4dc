"""A sandbox for generated code: hostile until proven otherwise.

Every program runs in its own process (`python -I -S`, no site-packages, scrubbed environment)
with a fresh temporary directory as its working directory and the only place it may write.
Layers (see sandbox_child.py): rlimits on CPU time, address space, file size, process count and
open files; a new network namespace (refusing sockets through the audit hook where the kernel
allows no namespace); privileges dropped to `nobody` when started as root; Landlock write
confinement to the temp dir; and a Python audit hook that refuses sockets, process creation,
signals to others, native code loading and writes or deletions outside the temp dir. The wall
clock timeout kills the whole process group. A program passes only when its code and its tests
ran to completion: an early `exit()` or a crash is a failure, never a pass.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py")
NOBODY = 65534


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, the whole process group is killed after it
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30  # address space
    file_bytes: int = 16 << 20  # largest file it may write, stdout and stderr included
    processes: int = 64  # RLIMIT_NPROC (counts threads; per user, so parallel runs share it)


@dataclass
class Result:
    passed: bool
    status: str  # passed | failed | timeout | signal:<name>
    returncode: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""
    layers: tuple[str, ...] = field(default_factory=tuple)


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_program(program: str, tests: str = "", limits: Limits = Limits()) -> Result:
    """Runs `program`, then `tests` (e.g. HumanEval's check), in a fresh sandbox."""
    workdir = Path(tempfile.mkdtemp(prefix="evomerge-sandbox-"))
    try:
        source = (
            "import os as _os, posix as _posix, sys as _sys\n"
            "def _no_exit(*_):\n    raise SystemExit('sandbox: os._exit is not allowed')\n"
            "_os._exit = _posix._exit = _no_exit\n"
            "del _os, _posix, _no_exit\n"
            "_program, _tests = " + repr(program) + ", " + repr(tests) + "\n"
            # Bound before any untrusted code runs, which executes in its own globals dict.
            "_fail, _write, _flush = SystemExit, _sys.stdout.write, _sys.stdout.flush\n"
            "import traceback as _traceback\n"
            "_globals = {'__name__': '__main__'}\n"
            "try:\n"
            "    exec(compile(_program, 'solution.py', 'exec'), _globals)\n"
            "    exec(compile(_tests, 'tests.py', 'exec'), _globals)\n"
            "except BaseException as _error:\n"  # SystemExit too: an early exit is not a pass
            "    _traceback.print_exception(_error)\n"
            "    raise _fail(1)\n"
            "_flush()\n"
            "_write('\\n__evomerge_completed__\\n')\n"
        )
        (workdir / "program.py").write_text(source, encoding="utf-8")
        if os.geteuid() == 0:
            os.chown(workdir, NOBODY, NOBODY)
            os.chmod(workdir, 0o700)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(workdir), "TMPDIR": str(workdir),
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        child_limits = {"cpu_seconds": int(limits.cpu_seconds), "memory_bytes": int(limits.memory_bytes),
                        "file_bytes": int(limits.file_bytes), "processes": int(limits.processes)}
        start = time.monotonic()
        with open(workdir / "stdout.txt", "wb") as out, open(workdir / "stderr.txt", "wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", str(CHILD), str(workdir), json.dumps(child_limits)],
                cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, close_fds=True,
            )
            timed_out = False
            try:
                returncode = process.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                returncode = None
            finally:
                try:
                    os.killpg(process.pid, signal.SIGKILL)  # the group: anything it started goes too
                except (ProcessLookupError, PermissionError):
                    pass
                if timed_out:
                    returncode = process.wait()
        seconds = time.monotonic() - start
        stdout, stderr = _tail(workdir / "stdout.txt"), _tail(workdir / "stderr.txt")
        layers = tuple(_tail(workdir / "layers.txt", 200).split())
        completed = returncode == 0 and "__evomerge_completed__" in stdout
        if timed_out:
            status = "timeout"
        elif returncode is not None and returncode < 0:
            status = f"signal:{signal.Signals(-returncode).name}"
        else:
            status = "passed" if completed else "failed"
        return Result(completed, status, returncode, seconds, stdout.replace("\n__evomerge_completed__\n", ""),
                      stderr, layers)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_programs(jobs: list[tuple[str, str]], limits: Limits = Limits(), workers: int | None = None) -> list[Result]:
    """Runs (program, tests) pairs in parallel, up to the number of cores."""
    workers = workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: run_program(job[0], job[1], limits), jobs))
