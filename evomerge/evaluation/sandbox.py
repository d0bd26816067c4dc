"""A sandbox for generated code: hostile until proven otherwise.

Two halves, in two processes:

- **The program** (prompt + completion) runs in its own process inside bubblewrap: new user, PID,
  network, IPC, UTS and cgroup namespaces, a private /proc (the evaluator and every other process
  are invisible and unreachable by signals), a minimal filesystem (the Python installation and
  system libraries read-only, its own temporary folder as the only writable place; no /etc, /home,
  /root, study databases or sockets), no capabilities, a new session, killed with its parent.
  Inside, sandbox_child.py adds rlimits (CPU, memory, file size, processes, open files), Landlock
  and an audit hook. Without bubblewrap the inner layers are all there is: evomerge then refuses
  to run generated code unless the user opts in with EVOMERGE_SANDBOX=weak.
- **The judge** (this module, in the evaluator) holds the tests. They never enter the program's
  process or any file it can read: the judge executes them with the entry point bound to a proxy
  that sends each call's arguments over a pipe and decodes the reply as plain data (builtin types
  only, see sandbox_child.encode). A program can return values; it cannot see the tests, rewrite
  them, print a verdict or forge one by exiting in some special way.

A program passes only when it loaded, defined its entry point, and the judge's tests ran to the end.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.evaluation import sandbox_child as child
from evomerge.evaluation.cgroups import Cgroups, join_command

log = logging.getLogger(__name__)

CHILD = Path(child.__file__)
NOBODY = 65534
INSIDE = "/sandbox"  # where the program's folder appears inside bubblewrap
MODE_ENV = "EVOMERGE_SANDBOX"  # auto (bubblewrap, else refuse) | weak (opt in to the inner layers alone)
# The interpreter generated code runs in (the child is standard library only, so any Python 3 does):
# this one by default; a system Python where this one lives in a folder the sandbox cannot mount,
# e.g. a private home when the evaluator runs as an ordinary user.
PYTHON_ENV = "EVOMERGE_SANDBOX_PYTHON"
CHILD_SOURCE = CHILD.read_text(encoding="utf-8")  # read once: the evaluator may not keep access to it


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, the whole process group is killed after it
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30  # address space
    file_bytes: int = 16 << 20  # largest file it may write, stdout and stderr included
    processes: int = 64  # processes and threads: the cgroup's pids.max, and RLIMIT_NPROC
    scratch_bytes: int = 64 << 20  # its writable folder and its /tmp: each a tmpfs of this size


@dataclass(frozen=True)
class Job:
    """One program and the tests the judge runs against it. `helpers` is trusted code the tests
    need (HumanEval's prompt: imports and helper functions); `entry_point` is the function the
    tests call. With no entry point the tests get no candidate (a program that loads passes)."""

    program: str
    tests: str = ""
    entry_point: str | None = None
    helpers: str = ""


@dataclass
class Result:
    passed: bool
    status: str  # passed | failed | timeout | signal:<name>
    returncode: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""
    layers: tuple[str, ...] = field(default_factory=tuple)
    reason: str = ""  # why the judge failed it


# ---------------------------------------------------------------------------- isolation


@functools.lru_cache(maxsize=None)
def bubblewrap() -> tuple[str, ...] | None:
    """The bubblewrap command line (without the program), or None when bubblewrap cannot run here."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None
    python = Path(os.environ.get(PYTHON_ENV) or sys.executable).resolve()
    prefixes = (sys.base_prefix, sys.prefix) if python == Path(sys.executable).resolve() else ()
    binds: list[str] = []
    for path in ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache", *prefixes,
                 str(python.parent.parent)):
        if os.path.exists(path):
            binds += ["--ro-bind", path, path]
    # Installed packages are hidden under empty folders: evomerge's own benchmark data (HumanEval's
    # tests and canonical solutions, in site-packages after `pip install .`) is what the judge knows.
    # The program runs `python -I -S`: the standard library is all it needs.
    hidden: list[str] = []
    for folder in _package_folders():
        if any(folder == b or folder.startswith(b.rstrip("/") + "/") for b in binds[2::3]):
            hidden += ["--tmpfs", folder]
    command = (bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
               "--uid", str(NOBODY), "--gid", str(NOBODY), *binds, *hidden, "--proc", "/proc", "--dev", "/dev",
               "--tmpfs", "/tmp", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8",
               "--setenv", "HOME", INSIDE, "--setenv", "TMPDIR", INSIDE, "--setenv", "PYTHONHASHSEED", "0",
               "--setenv", "PYTHONDONTWRITEBYTECODE", "1")
    probe = subprocess.run([*command, str(python), "-I", "-S", "-c", "pass"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        log.warning("bubblewrap is installed but cannot start a sandbox here: %s",
                    probe.stderr.decode(errors="replace").strip()[:300])
        return None
    return (*command, str(python))


@functools.lru_cache(maxsize=None)
def _sized_tmpfs() -> bool:
    """Whether this bubblewrap takes `--size` for a tmpfs (0.7 and later; Ubuntu 22.04 has 0.6):
    without it the program writes into a bind-mounted scratch folder, bounded by rlimits only."""
    wrap = bubblewrap()
    if wrap is None:
        return False
    probe = subprocess.run([*wrap[:-1], "--size", str(1 << 20), "--tmpfs", "/evomerge-probe", wrap[-1], "-I", "-S",
                            "-c", "pass"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        log.warning("sandbox: this bubblewrap has no --size; the program's folder is a bind mount bounded by rlimits "
                    "(bubblewrap 0.7 or later makes it a size-limited tmpfs)")
    return probe.returncode == 0


def _package_folders() -> list[str]:
    """Every folder Python installs packages into, on this machine (site- and dist-packages)."""
    import site
    import sysconfig

    found = {*site.getsitepackages(), site.getusersitepackages(),
             *(sysconfig.get_paths().get(k) for k in ("purelib", "platlib"))}
    found |= {str(p) for p in Path("/usr/lib").glob("python3*/dist-packages")}
    found |= {str(p) for p in Path("/usr/local/lib").glob("python3*/dist-packages")}
    return sorted(str(Path(f).resolve()) for f in found if f and os.path.isdir(f))


def describe() -> dict:
    """What isolates generated code on this machine, for logs and summary.json."""
    cgroup = Cgroups.available() is not None
    limits = (["cgroup: processes, threads and memory of the whole program (shared memory included)"] if cgroup
              else [])
    missing = ([] if cgroup else
               ["a pids and memory cgroup (none can be made here): processes, threads and memory are bounded per "
                "process by rlimits alone" + (", and RLIMIT_NPROC does not bind a program whose uid outside its "
                                              "namespace is root" if os.geteuid() == 0 else "")])
    if bubblewrap() is not None:
        return {"isolation": "bubblewrap", "layers": ["user, pid, net, ipc, uts, cgroup namespaces", "private /proc",
                "read-only minimal filesystem (installed packages hidden)",
                *(["writable folder and /tmp as size-limited tmpfs"] if _sized_tmpfs() else []),
                "no capabilities", "new session", "fresh session keyring", *limits, "rlimits", "landlock",
                "audit hook", "tests in a separate judge process"], **({"missing": missing} if missing else {})}
    weak = os.environ.get(MODE_ENV) == "weak"
    return {"isolation": "weak (opted in)" if weak else "none: refused",
            "layers": [*limits, "rlimits", "fresh session keyring", "network namespace", "landlock", "audit hook",
                       "tests in a separate judge process"],
            "missing": ["process isolation (bubblewrap): the program can see and signal other processes and read "
                        "what its user can read", *missing]}


def require_isolation() -> None:
    """Refuses to run generated code without process isolation unless the user opted in."""
    if bubblewrap() is None and os.environ.get(MODE_ENV) != "weak":
        raise EvomergeError(
            "scoring a code task (HumanEval, ...) runs generated code, and bubblewrap (process isolation) is not usable here; "
            f"install it (apt-get install bubblewrap) or set {MODE_ENV}=weak to accept the in-process layers alone")


@functools.lru_cache(maxsize=None)
def _announce() -> None:
    info = describe()
    log.info("sandbox for generated code: %s (%s)", info["isolation"], ", ".join(info["layers"]))
    for missing in info.get("missing", []):
        log.warning("sandbox: missing %s", missing)


# ---------------------------------------------------------------------------- the judge


REPLY_LIMIT = 1 << 20  # the largest reply the judge reads (a return value, encoded): 1 MiB
# What decoding one reply may cost (sandbox_child.decode): values, items of one set or dict (hashing
# attacker-chosen keys stays cheap), levels of nesting.
REPLY_DECODE_LIMITS = (100_000, 10_000, 100)


class _Channel:
    """The judge's end of the two pipes, with a deadline on every read and every write."""

    def __init__(self, requests: int, replies: int, deadline: float):
        self.requests, self.replies, self.deadline = requests, replies, deadline
        os.set_blocking(requests, False)  # a program that fills its request pipe cannot block the judge

    def _read(self, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.replies], [], [], left)[0]:
                raise TimeoutError("the program did not answer in time")
            chunk = os.read(self.replies, min(size - len(data), 1 << 20))
            if not chunk:
                return None
            data += chunk
        return data

    def receive(self) -> dict | None:
        head = self._read(4)
        if head is None:
            return None
        size = int.from_bytes(head, "big")
        if size > REPLY_LIMIT:
            raise ValueError(f"the program sent a message over {REPLY_LIMIT >> 20} MiB")
        body = self._read(size)
        message = json.loads(body) if body is not None else None
        if message is not None and not isinstance(message, dict):
            raise ValueError("the program sent something that is not a message")
        return message

    def send(self, message: dict) -> None:
        data = child.frame(message)
        while data:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([], [self.requests], [], left)[1]:
                raise TimeoutError("the program did not take the call in time")
            try:
                data = data[os.write(self.requests, data):]
            except BlockingIOError:
                continue

    def close(self) -> None:
        try:
            os.close(self.requests)
        except OSError:
            pass


class CandidateFailed(Exception):
    """The program died, raised, or answered with something that is not plain data."""


class _Candidate:
    """What the tests call: each call crosses to the program and comes back as plain data."""

    def __init__(self, channel: _Channel):
        self.channel = channel

    def __call__(self, *args, **kwargs):
        nonce = secrets.token_hex(16)
        try:
            self.channel.send({"args": child.encode(list(args)), "kwargs": child.encode(dict(kwargs)), "nonce": nonce})
        except BrokenPipeError:
            raise CandidateFailed("the program is gone") from None
        reply = self.channel.receive()
        if reply is None:
            raise CandidateFailed("the program is gone")
        if reply.get("nonce") != nonce:  # written before the call, or for another one: forged
            raise CandidateFailed("a reply that does not answer this call")
        if "raised" in reply:
            raise CandidateFailed(f"the program raised {str(reply['raised'])[:300]}")
        try:
            return child.decode(reply["value"], REPLY_DECODE_LIMITS)
        except (KeyError, ValueError, TypeError, RecursionError) as exc:
            raise CandidateFailed(f"not plain data: {exc}") from None


def _reported_layers(ready: dict) -> tuple[str, ...]:
    """The inner layers the child says it set up (informational: never part of a verdict)."""
    found = ready.get("layers")
    if type(found) is not list:
        return ()
    return tuple(str(name)[:40] for name in found[:20] if type(name) is str)


def _judge(job: Job, channel: _Channel, layers: list[str]) -> str:
    """Runs the tests against the program; returns why it failed, or '' when it passed. The layers the
    child reported on "ready" go into `layers`."""
    try:
        ready = channel.receive()
    except (TimeoutError, ValueError) as exc:
        return f"never ready: {exc}"
    if not ready or ready.get("ready") is not True:
        return "the program did not load"
    layers.extend(_reported_layers(ready))
    if job.entry_point and ready.get("entry") is not True:
        return f"the program does not define {job.entry_point}()"
    namespace: dict = {"__name__": "__judge__"}
    try:
        exec(compile(job.helpers, "helpers.py", "exec"), namespace)
        if job.entry_point:
            namespace[job.entry_point] = _Candidate(channel)
        exec(compile(job.tests, "tests.py", "exec"), namespace)
    except CandidateFailed as exc:
        return str(exc)
    except (TimeoutError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # an assertion of the tests, or an error computing with the answers
        return f"tests failed: {type(exc).__name__}: {str(exc)[:200]}"
    return ""


# ---------------------------------------------------------------------------- running


def _tail(path: Path, limit: int = 4000) -> str:
    """The end of a file the program may have replaced: opened without following a link and without
    blocking (a FIFO), read only if it is a regular file, never more than `limit` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return ""
        os.lseek(fd, max(0, info.st_size - limit), os.SEEK_SET)
        return os.read(fd, limit).decode("utf-8", "replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


def _remove(folder: Path) -> None:
    """Removes a folder the program wrote into, whatever it made there (3,000 nested folders, links,
    FIFOs, read-only modes); never follows a link, never raises. Python's own removal first (no
    process to start); what it cannot do (a tree deeper than its recursion or than PATH_MAX, a folder
    without permissions) goes to coreutils, which walk any depth by file descriptor."""
    try:
        shutil.rmtree(folder)
        return
    except Exception:  # RecursionError, ENAMETOOLONG, EACCES, EMFILE: all handled below
        pass
    for command in (["chmod", "-R", "u+rwx", "--", str(folder)], ["rm", "-rf", "--", str(folder)]):
        try:
            subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=120, check=False)
        except (OSError, subprocess.SubprocessError):
            pass


def run_job(job: Job, limits: Limits = Limits()) -> Result:
    """Runs one program in a fresh sandbox and judges it."""
    require_isolation()
    _announce()
    wrap = bubblewrap()
    scratch = Path(tempfile.mkdtemp(prefix="evomerge-sandbox-"))
    workdir = scratch / "program"  # the program's files (under bubblewrap it writes only into tmpfs)
    workdir.mkdir()
    request_r, request_w = os.pipe()
    reply_r, reply_w = os.pipe()
    cgroups = Cgroups.available()
    cgroup = cgroups.make() if cgroups is not None else None
    try:
        (workdir / "program.py").write_text(job.program, encoding="utf-8")
        (workdir / "child.py").write_text(CHILD_SOURCE, encoding="utf-8")
        if os.geteuid() == 0 and wrap is None:  # the weak path drops root to nobody inside the child
            os.chown(workdir, NOBODY, NOBODY)
            os.chmod(workdir, 0o700)
        inside = INSIDE if wrap else str(workdir)
        child_limits = {"cpu_seconds": int(limits.cpu_seconds), "memory_bytes": int(limits.memory_bytes),
                        "file_bytes": int(limits.file_bytes), "processes": int(limits.processes)}
        program = [f"{inside}/child.py", inside, json.dumps(child_limits), str(request_r), str(reply_w),
                   job.entry_point or ""]
        sized = wrap is not None and _sized_tmpfs()
        if wrap:
            size = str(int(limits.scratch_bytes))
            # its folder and /tmp as tmpfs of bounded size (nothing it writes reaches the host's disk),
            # else (bubblewrap < 0.7) its folder bind-mounted
            mounts = (["--size", size, "--perms", "1777", "--tmpfs", "/tmp", "--size", size, "--perms", "0700",
                       "--tmpfs", INSIDE, "--ro-bind", str(workdir / "program.py"), f"{INSIDE}/program.py",
                       "--ro-bind", str(workdir / "child.py"), f"{INSIDE}/child.py"] if sized
                      else ["--bind", str(workdir), INSIDE])
            command = [*wrap[:-1], *mounts, "--chdir", INSIDE, wrap[-1], "-I", "-S", *program]
            env = None
        else:
            command = [os.environ.get(PYTHON_ENV) or sys.executable, "-I", "-S", *program]
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": inside, "TMPDIR": inside,
                   "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        if cgroup is not None:  # processes, threads and memory (shared memory, tmpfs) of the whole tree
            try:
                cgroup.limit(processes=int(limits.processes),
                             memory_bytes=int(limits.memory_bytes) + 2 * int(limits.scratch_bytes) + (64 << 20))
                command = join_command(cgroup, command)
            except OSError as exc:
                log.warning("sandbox: could not limit the program's cgroup (%s); rlimits alone hold", exc)
                cgroup.close()
                cgroup = None
        start = time.monotonic()
        with open(scratch / "stdout.txt", "wb") as out, open(scratch / "stderr.txt", "wb") as err:
            process = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=err, start_new_session=True, close_fds=True,
                                       pass_fds=(request_r, reply_w))
        os.close(request_r)
        os.close(reply_w)
        request_r = reply_w = -1
        channel = _Channel(request_w, reply_r, start + limits.timeout_s)
        request_w = -1  # owned by the channel now
        layers: list[str] = []
        reason = _judge(job, channel, layers)
        channel.close()  # the program's end of the loop: it exits
        timed_out = False
        try:
            returncode = process.wait(timeout=max(0.1, min(2.0, start + limits.timeout_s - time.monotonic())))
        except subprocess.TimeoutExpired:
            returncode = None
            timed_out = time.monotonic() - start >= limits.timeout_s
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the group (bubblewrap's namespace goes with it)
            except (ProcessLookupError, PermissionError):
                pass
            if returncode is None:
                returncode = process.wait()
        seconds = time.monotonic() - start
        timed_out = timed_out or "in time" in reason
        if timed_out:
            status = "timeout"
        elif reason and returncode is not None and returncode < 0:
            status = f"signal:{signal.Signals(-returncode).name}"
        else:
            status = "failed" if reason else "passed"
        held = (*layers, *(("bubblewrap",) if wrap else ()), *(("tmpfs",) if sized else ()), *(("cgroup",) if cgroup else ()))
        return Result(not reason, status, returncode, seconds, _tail(scratch / "stdout.txt"),
                      _tail(scratch / "stderr.txt"), held, reason)
    finally:
        for fd in (request_r, request_w, reply_r, reply_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if cgroup is not None:
            cgroup.close()
        _remove(scratch)


def run_program(program: str, tests: str = "", limits: Limits = Limits(), **job: str) -> Result:
    return run_job(Job(program, tests, **job), limits)


def run_jobs(jobs: list[Job], limits: Limits = Limits(), workers: int | None = None) -> list[Result]:
    """Runs jobs in parallel, up to the number of cores; a job whose run breaks fails alone (every
    other verdict of the batch stands)."""
    workers = workers or max(1, os.cpu_count() or 1)

    def one(job: Job) -> Result:
        try:
            return run_job(job, limits)
        except EvomergeError:
            raise  # no isolation here: refused for the whole batch, as before any job
        except Exception as exc:  # noqa: BLE001 - the program's doing, or the machine's: this item fails
            log.warning("a sandboxed job failed to run: %s: %s", type(exc).__name__, exc)
            return Result(False, "error", None, 0.0, reason=f"{type(exc).__name__}: {exc}"[:300])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, jobs))
