"""Tensor kernels shared by several methods.

`weighted_sum` is the hot path of linear and task-arithmetic merges: on the CPU it works in
chunks that stay in the last-level cache, so each input is read once and the output written
once (about 1.7x faster here than one full-tensor pass per input); on CUDA, one pass per input.
"""

from __future__ import annotations

from typing import Sequence

import torch

# 1M elements (4 MB in float32): the accumulator chunk stays in L2/L3 while every input
# streams through it once. Measured on a 2-core EPYC: 256K elements 0.6x, 1M 0.84x, 4M 0.7x copy speed.
CPU_CHUNK_ELEMENTS = 1 << 20


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


def smallest_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k smallest entries of a 1-D tensor; equal values go to the lower index.

    O(n) through kthvalue. mergekit ranks with torch's unstable sort, whose order among equal
    values is an implementation detail (it differs between devices and input sizes); this rule is
    deterministic everywhere and selects the same values whenever the threshold is not tied.
    """
    n = values.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    threshold = torch.kthvalue(values, k).values
    mask = values < threshold
    _fill_ties(mask, values == threshold, k - int(mask.sum()))
    return mask


def largest_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of a 1-D tensor; equal values go to the lower index."""
    n = values.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    threshold = torch.kthvalue(values, n - k + 1).values
    mask = values > threshold
    _fill_ties(mask, values == threshold, k - int(mask.sum()))
    return mask


def _fill_ties(mask: torch.Tensor, tied: torch.Tensor, needed: int) -> None:
    if needed > 0:
        mask[tied.nonzero().squeeze(1)[:needed]] = True
