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
        if target.exists():
            shutil.rmtree(target)
        os.replace(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
