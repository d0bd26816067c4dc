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


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yields a scratch directory beside `target` that replaces it only if the block succeeds,
    so an interrupted build never leaves a half-written directory that a later run would trust."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield scratch
        _ordinary_permissions(scratch)
        if target.exists():
            shutil.rmtree(target)
        os.replace(scratch, target)
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
