"""Device and dtype selection, and how much memory is left to spend: shared by the engine and the
evaluator (which know nothing of each other). The one table of dtype names lives here."""

from __future__ import annotations

import os

import psutil
import torch

from evomerge.errors import EvomergeError
from evomerge.sharing import cores

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(name: str | torch.dtype | None, *, field: str = "dtype") -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    key = name.removeprefix("torch.")
    if key not in DTYPES:
        raise EvomergeError(f"{field}: unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def target_device(name: str | torch.device | None = "auto") -> torch.device:
    """The device a name means ('auto': CUDA when present, else CPU), whether or not this machine has it
    (a memory plan for another box)."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """target_device, on this machine: a CUDA device named that it lacks is an error."""
    if isinstance(name, torch.device):
        return name
    device = target_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvomergeError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def available_cores() -> int:
    """How many cores this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    return len(cores())


def use_threads(threads: int | None = None) -> int:
    """One thread count for torch's intra-op pool and the tokenizers' pool (default: the cores
    available): torch's own default ignores the affinity mask and oversubscribes shared machines."""
    threads = threads or available_cores()
    torch.set_num_threads(threads)
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when the tokenizers' pool first starts
    return threads


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)
