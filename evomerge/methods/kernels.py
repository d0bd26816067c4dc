"""Tensor kernels shared by several methods.

`weighted_sum` is the hot path of linear and task-arithmetic merges: on the CPU it works in
chunks that stay in the last-level cache, so each input is read once and the output written
once (about 1.7x faster here than one full-tensor pass per input); on CUDA, one pass per input.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

# 1M elements (4 MB in float32): the accumulator chunk stays in L2/L3 while every input
# streams through it once. Measured on a 2-core EPYC: 256K elements 0.6x, 1M 0.84x, 4M 0.7x copy speed.
CPU_CHUNK_ELEMENTS = 1 << 20


class Workspace:
    """Reusable scratch buffers, one per named slot, grown as needed and never shrunk.

    On CPUs a fresh large tensor costs ~0.25 ms per MB in page faults (about 4 GB/s, slower than
    the arithmetic done on it), so merge kernels that run per candidate take their temporaries
    from here. A non-persistent workspace simply allocates (for one-off calls).
    """

    def __init__(self, persistent: bool = True):
        self.persistent = persistent
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, slot: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """An uninitialised buffer with the shape of `like` (its dtype unless given)."""
        dtype = dtype or like.dtype
        if not self.persistent:
            return torch.empty(like.shape, dtype=dtype, device=like.device)
        key = (slot, dtype, like.device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < like.numel():
            self._buffers.pop(key, None)
            buffer = torch.empty(like.numel(), dtype=dtype, device=like.device)
            self._buffers[key] = buffer
        return buffer[: like.numel()].view(like.shape)

    def zeros(self, like: torch.Tensor) -> torch.Tensor:
        """A zero buffer shaped like `like`; callers must never write into it."""
        if not self.persistent:
            return torch.zeros(like.shape, dtype=like.dtype, device=like.device)
        key = ("__zeros__", like.dtype, like.device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < like.numel():
            buffer = torch.zeros(like.numel(), dtype=like.dtype, device=like.device)
            self._buffers[key] = buffer
        return buffer[: like.numel()].view(like.shape)

    def clear(self) -> None:
        self._buffers.clear()


def masked(values: torch.Tensor, keep: torch.Tensor, out: torch.Tensor, workspace: Workspace) -> torch.Tensor:
    """values where keep else 0, into out (torch.where on same-shape tensors: 6x faster than values * keep)."""
    return torch.where(keep, values, workspace.zeros(values), out=out)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def weighted_sum(
    tensors: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns sum_i coefficients[i] * tensors[i], accumulated in float32 (float64 stays float64).

    Writes into `out` when given (any float dtype, contiguous); inputs with a zero coefficient
    are never read.
    """
    if len(tensors) != len(coefficients):
        raise ValueError(f"{len(tensors)} tensors but {len(coefficients)} coefficients")
    first = tensors[0]
    acc_dtype = accumulation_dtype(first.dtype)
    if out is None:
        out = torch.empty(first.shape, dtype=first.dtype, device=first.device)
    terms = [(x.reshape(-1), float(c)) for x, c in zip(tensors, coefficients) if c != 0]
    flat_out = out.view(-1)
    if not terms:
        return out.zero_()
    n = flat_out.numel()
    chunk = n if flat_out.device.type != "cpu" else CPU_CHUNK_ELEMENTS
    direct = out.dtype == acc_dtype
    scratch = None if direct else torch.empty(min(chunk, n), dtype=acc_dtype, device=out.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        acc = flat_out[start:stop] if direct else scratch[: stop - start]
        (x0, c0), rest = terms[0], terms[1:]
        if x0.dtype == acc_dtype:
            torch.mul(x0[start:stop], c0, out=acc)
        else:
            acc.copy_(x0[start:stop]).mul_(c0)
        for x, c in rest:
            acc.add_(x[start:stop], alpha=c)
        if not direct:
            flat_out[start:stop].copy_(acc)
    return out


# Sample sizes for bracketing (measured on a 2-core EPYC: 4K best below ~2M entries, 16K above;
# sorting even 64K entries costs ~5 ms there).
_SMALL_SAMPLE, _LARGE_SAMPLE = 1 << 12, 1 << 14


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly torch.kthvalue(values, k).values for a 1-D tensor (k is 1-based), in a few streaming
    passes: a strided sample brackets the answer, entries below the bracket are counted, and the
    exact selection runs only inside the bracket (~1% of the entries). About 10x faster than
    kthvalue on tens of millions of entries; falls back to it when the bracket misses."""
    n = values.numel()
    sample_size = _SMALL_SAMPLE if n < (1 << 21) else _LARGE_SAMPLE
    if n <= 4 * sample_size:
        return torch.kthvalue(values, k).values
    sample = values[:: n // sample_size].sort().values
    m = sample.numel()
    q = (k - 0.5) / n
    margin = 4.0 * math.sqrt(q * (1 - q) / m) + 2.0 / m
    lo = sample[max(0, math.floor((q - margin) * m))]
    hi = sample[min(m - 1, math.ceil((q + margin) * m))]
    below = int(torch.count_nonzero(values < lo))
    if below < k:
        if lo == hi:  # a run of equal values (e.g. the zeros of a sparse task vector)
            if below + int(torch.count_nonzero(values == lo)) >= k:
                return lo
        else:
            window = values[(values >= lo) & (values <= hi)]
            if below + window.numel() >= k:
                return torch.kthvalue(window, k - below).values
    return torch.kthvalue(values, k).values


def smallest_mask(values: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the k smallest entries of a 1-D tensor; equal values go to the lower index.

    mergekit ranks with torch's unstable sort, whose order among equal values is an
    implementation detail (it differs between devices and sizes); this rule is deterministic
    everywhere and selects the same values whenever the threshold is not tied.
    """
    n = values.numel()
    mask = out if out is not None else torch.empty(n, dtype=torch.bool, device=values.device)
    if k <= 0 or k >= n:
        return mask.fill_(k > 0)
    threshold = kth_smallest(values, k)
    torch.le(values, threshold, out=mask)
    _drop_extra_ties(mask, values, threshold, int(torch.count_nonzero(mask)) - k)
    return mask


def largest_mask(values: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the k largest entries of a 1-D tensor; equal values go to the lower index."""
    n = values.numel()
    mask = out if out is not None else torch.empty(n, dtype=torch.bool, device=values.device)
    if k <= 0 or k >= n:
        return mask.fill_(k > 0)
    threshold = kth_smallest(values, n - k + 1)
    torch.ge(values, threshold, out=mask)
    _drop_extra_ties(mask, values, threshold, int(torch.count_nonzero(mask)) - k)
    return mask


def _drop_extra_ties(mask, values, threshold, extra: int) -> None:
    """More entries than wanted equal the threshold: unselect the highest-index ones."""
    if extra > 0:
        tied = (values == threshold).nonzero().squeeze(1)
        mask[tied[-extra:]] = False
