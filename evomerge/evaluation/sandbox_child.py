"""Runs one untrusted program inside the sandbox and answers calls to its entry point.

Started (inside bubblewrap when available, see sandbox.py) as
`python -I -S sandbox_child.py DIR LIMITS REQUEST_FD REPLY_FD ENTRY_POINT`. Standard library only,
so it runs in isolated mode without site-packages. Before the program runs it applies resource
limits, leaves the network (a new network namespace), drops root to `nobody` where it can,
restricts filesystem writes to DIR with Landlock, and installs an audit hook that refuses sockets,
process creation, signals to other processes, native-code loading and writes outside DIR.

The verdict is not decided here: the tests run in the judge (sandbox.py), outside, and reach the
program only through calls to its entry point. This process executes the program, says "ready",
then answers each call (arguments and return values as plain data, `encode`/`decode`) on the pipe.
Whatever the program does to this process can only change what its function returns.
"""

import ctypes
import json
import os
import resource
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_NO_NEW_PRIVS = 38
NOBODY = 65534

# Landlock (Linux >= 5.13): syscall numbers are the same on x86-64 and arm64.
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REMOVE_DIR, FS_REMOVE_FILE, FS_MAKE_CHAR, FS_MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
FS_MAKE_REG, FS_MAKE_SOCK, FS_MAKE_FIFO, FS_MAKE_BLOCK, FS_MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1

# keyctl(2): the session keyring is inherited, so a program could read the evaluator's keys or plant
# one the next program reads; each program joins a fresh anonymous one.
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}.get(os.uname().machine)
KEYCTL_JOIN_SESSION_KEYRING = 1

libc = ctypes.CDLL(None, use_errno=True)
layers = []


def set_limits(limits):
    for name, value in (
        ("RLIMIT_CPU", limits["cpu_seconds"]),
        ("RLIMIT_AS", limits["memory_bytes"]),
        ("RLIMIT_FSIZE", limits["file_bytes"]),
        ("RLIMIT_NPROC", limits["processes"]),
        ("RLIMIT_NOFILE", 64),
        ("RLIMIT_CORE", 0),
    ):
        resource.setrlimit(getattr(resource, name), (value, value))
    layers.append("rlimits")


def leave_network():
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    if libc.unshare(flags) == 0:
        layers.append("netns")


def fresh_keyring():
    libc.syscall.restype = ctypes.c_long
    if SYS_KEYCTL is not None and libc.syscall(SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None) >= 0:
        layers.append("keyring")


def world_readable(path):
    """Whether an unprivileged user can read `path` (every parent directory traversable)."""
    path = os.path.realpath(path)
    if not os.stat(path).st_mode & 0o004:
        return False
    while path != "/":
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & 0o001:
            return False
    return True


def drop_root(workdir):
    # As `nobody` the program could not import the standard library of an interpreter installed
    # under a private home (e.g. /root/.pyenv); then root stays, confined by the other layers.
    if os.geteuid() != 0 or not world_readable(os.path.dirname(os.__file__)):
        return
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    layers.append("nobody")


class RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock(workdir):
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, 1)
    if abi < 1:
        return
    write_rights = (FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_CHAR | FS_MAKE_DIR | FS_MAKE_REG
                    | FS_MAKE_SOCK | FS_MAKE_FIFO | FS_MAKE_BLOCK | FS_MAKE_SYM)
    if abi >= 2:
        write_rights |= FS_REFER
    if abi >= 3:
        write_rights |= FS_TRUNCATE
    attr = RulesetAttr(write_rights, (NET_BIND_TCP | NET_CONNECT_TCP) if abi >= 4 else 0, 0)
    size = ctypes.sizeof(RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        return
    fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
    rule = PathBeneathAttr(write_rights, fd)
    if libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0) != 0:
        return
    os.close(fd)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return
    if libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) == 0:
        layers.append(f"landlock-v{abi}")


WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
BLOCKED_EVENTS = {
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
    "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.Popen",
    "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.setuid", "os.chroot", "sys._current_frames",
    "os.add_dll_directory", "os.startfile", "webbrowser.open",
}
PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.link", "os.symlink", "os.truncate",
               "os.chmod", "os.chown", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile",
               "shutil.copytree", "os.chdir"}


def audit_guard(workdir):
    root = os.path.realpath(workdir) + os.sep
    me = os.getpid()

    def inside(path):
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(root)
        except Exception:
            return False

    def hook(event, args):
        if event in BLOCKED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):
                return
            text = os.fsdecode(path)
            if text.startswith("/proc/") and not text.startswith("/proc/self/"):
                raise PermissionError("sandbox: other processes' /proc entries are not readable")
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing outside the sandbox directory: {text}")
        elif event in PATH_EVENTS:
            if not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
                raise PermissionError(f"sandbox: {event} outside the sandbox directory")
        elif event in ("os.kill", "os.killpg"):
            if args[0] not in (me, 0):
                raise PermissionError("sandbox: signalling other processes is not allowed")

    sys.addaudithook(hook)
    layers.append("audit")


# ---------------------------------------------------------------------------- plain data
# Tagged JSON for the builtin data types; anything else cannot cross. sandbox.py uses the same two
# functions (this file is standard library only, so it is imported there as a module).

_TAGS = {list: "list", tuple: "tuple", set: "set", frozenset: "frozenset"}


def encode(value):
    kind = type(value)
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        return value if value == value and value not in (float("inf"), float("-inf")) else {"float": repr(value)}
    if kind in _TAGS:
        return {_TAGS[kind]: [encode(v) for v in value]}
    if kind is dict:
        return {"dict": [[encode(k), encode(v)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    raise TypeError(f"not plain data: {kind.__name__}")


def decode(data, limits=None):
    """The value `encode` made. `limits` = (values, items of one set or dict, depth) bound what decoding
    may cost when the data come from the program (the judge's side); the judge's own calls need none."""
    return _decode(data, [limits[0]] if limits else None, limits, 0)


def _decode(data, budget, limits, depth):
    if budget is not None:
        budget[0] -= 1
        if budget[0] < 0 or depth > limits[2]:
            raise ValueError("the reply is too large or too deep")
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is not dict or len(data) != 1:
        raise ValueError("not an encoded value")
    (tag, inner), = data.items()
    if limits and tag in ("set", "frozenset", "dict") and len(inner) > limits[1]:
        raise ValueError(f"a {tag} of more than {limits[1]} items")
    if tag == "float":
        return float({"nan": "nan", "inf": "inf", "-inf": "-inf"}[inner])
    if tag in ("list", "tuple", "set", "frozenset"):
        if type(inner) is not list:
            raise ValueError("not an encoded value")
        items = [_decode(v, budget, limits, depth + 1) for v in inner]
        return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
    if tag == "dict":
        return {_decode(k, budget, limits, depth + 1): _decode(v, budget, limits, depth + 1) for k, v in inner}
    if tag == "bytes":
        return bytes.fromhex(inner)
    if tag == "complex":
        return complex(float(inner[0]), float(inner[1]))
    raise ValueError(f"unknown tag {tag!r}")


MAX_MESSAGE = 16 << 20


def frame(message):
    """A message as it crosses a pipe: its JSON's length (4 bytes, big-endian), then the JSON."""
    data = json.dumps(message).encode()
    return len(data).to_bytes(4, "big") + data


def send(stream, message):
    stream.write(frame(message))


def receive(stream):
    """The next message, or None at the end of the stream."""
    head = stream.read(4)
    if len(head) < 4:
        return None
    size = int.from_bytes(head, "big")
    if size > MAX_MESSAGE:
        raise ValueError("message too large")
    body = stream.read(size)
    return json.loads(body) if len(body) == size else None


def serve(entry, requests, replies):
    """Answers calls until the judge closes the request pipe."""
    while True:
        message = receive(requests)
        if message is None:
            return
        try:
            value = entry(*decode(message["args"]), **decode(message["kwargs"]))
            reply = {"value": encode(value)}
        except BaseException as error:  # the candidate's failure, reported as such
            reply = {"raised": f"{type(error).__name__}: {error}"[:500]}
        reply["nonce"] = message.get("nonce")  # which call this answers: a reply written ahead cannot know it
        send(replies, reply)


def main():
    workdir, limits = sys.argv[1], json.loads(sys.argv[2])
    requests = os.fdopen(int(sys.argv[3]), "rb", buffering=0)
    replies = os.fdopen(int(sys.argv[4]), "wb", buffering=0)
    entry_point = sys.argv[5]
    os.chdir(workdir)
    set_limits(limits)
    fresh_keyring()
    leave_network()
    drop_root(workdir)
    landlock(workdir)
    audit_guard(workdir)
    # Taken once every layer is in place (the report lists what holds, not what was intended) and
    # before the program runs; sent with "ready", never through a file the judge would have to open.
    held = list(layers)
    sys.setrecursionlimit(limits.get("recursion", 3000))
    with open(os.path.join(workdir, "program.py"), encoding="utf-8") as handle:
        source = handle.read()
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(source, "program.py", "exec"), namespace)
    entry = namespace.get(entry_point) if entry_point else None
    send(replies, {"ready": True, "entry": callable(entry), "layers": held})
    if callable(entry):
        serve(entry, requests, replies)


if __name__ == "__main__":
    main()
