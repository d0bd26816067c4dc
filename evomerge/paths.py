"""Where evomerge keeps things between runs."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def cache_dir() -> Path:
    """$EVOMERGE_CACHE, else $XDG_CACHE_HOME/evomerge, else ~/.cache/evomerge."""
    if os.environ.get("EVOMERGE_CACHE"):
        return Path(os.environ["EVOMERGE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "evomerge"


PARTIAL, OLD = "partial", "old"  # .<name>.partial-<pid>-…: being written; .<name>.old-<pid>-…: being replaced


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(target: Path, kind: str) -> list[Path]:
    """Scratch folders of `target` left by a process that is gone (killed mid-write)."""
    found = []
    for path in target.parent.glob(f".{target.name}.{kind}-*"):
        pid = path.name.rsplit(f".{kind}-", 1)[1].split("-", 1)[0]
        if path.is_dir() and not (pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid()):
            found.append(path)
    return found


def recover_directory(target: Path) -> None:
    """Undoes what a killed replacement of `target` left: a folder that was being replaced is put back
    when nothing took its place (the old folder, whole), and scratch folders are removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    old = sorted(_leftovers(target, OLD), key=lambda p: p.stat().st_mtime)
    if old and not target.exists():
        os.replace(old.pop(), target)
    for path in [*old, *_leftovers(target, PARTIAL)]:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yields a scratch directory beside `target` that replaces it only if the block succeeds, so an
    interrupted build never leaves a half-written directory that a later run would trust. The swap
    is two renames (the old folder aside, the new one in) and then the old one's removal: killed at any
    point, `target` is the old folder or the new one, whole, once `recover_directory` has run (the
    next replacement runs it first, and removes what a killed run left)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.{PARTIAL}-{os.getpid()}-", dir=target.parent))
    try:
        yield scratch
        _ordinary_permissions(scratch)
        aside = None
        if target.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.{OLD}-{os.getpid()}-", dir=target.parent))
            os.replace(target, aside)  # an empty directory is replaced: the old folder now sits aside
        os.replace(scratch, target)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yields a scratch file beside `target` that replaces it only if the block succeeds: a reader (or
    a later run) sees the old file or the new one, never half of one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    os.close(handle)
    scratch = Path(name)
    try:
        yield scratch
        os.chmod(scratch, 0o666 & ~_umask())
        os.replace(scratch, target)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise


def atomic_write_text(target: Path, text: str) -> None:
    """Writes `text` to `target` whole or not at all (`atomic_file`)."""
    with atomic_file(target) as scratch:
        scratch.write_text(text, encoding="utf-8")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _ordinary_permissions(folder: Path) -> None:
    """What the umask gives new files and folders: mkdtemp's 0700, and the 0600 some writers use for
    their temporary files (safetensors, the peft/transformers savers), would make the result private."""
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
