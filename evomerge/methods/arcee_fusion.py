"""arcee_fusion: keep only the changes whose importance (|delta| times the KL divergence of the
rows' softmax) is an outlier: above median + 1.5 * IQR."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evomerge.methods.kernels import kth_smallest
from evomerge.methods.registry import BasePolicy, Inputs, define

# Quantiles of larger tensors are estimated from this many samples (with replacement).
QUANTILE_SAMPLES = 1_000_000


def _quantiles(values: torch.Tensor, q: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    flat = values.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLES:
        picks = torch.randint(flat.numel(), (QUANTILE_SAMPLES,), device=flat.device, generator=generator)
        flat = flat[picks]
    positions = (q * (flat.numel() - 1)).long().tolist()
    # The value at sorted position p, without sorting everything.
    return torch.stack([kth_smallest(flat, p + 1) for p in positions])


def importance(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    p = F.softmax(tensor, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (tensor - base).abs() * kl


def fuse(inputs: Inputs, generator: torch.Generator | None, mask_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The base plus the changes whose importance is an outlier; the mask in `mask_dtype` (default:
    the inputs' dtype; mergekit's float32 mask promotes a 16-bit result to float32)."""
    base = inputs.base
    (other,) = inputs.others
    scores = importance(other, base)
    q1, median, q3 = _quantiles(scores, torch.tensor([0.25, 0.5, 0.75]), generator)
    mask = (scores >= median + 1.5 * (q3 - q1)).to(mask_dtype or base.dtype)
    return base + (other - base) * mask


# random: only for tensors above QUANTILE_SAMPLES elements
@define(base=BasePolicy.REQUIRED, min_inputs=2, max_inputs=2, reference="https://arcee.ai")
def arcee_fusion(inputs: Inputs, *, generator: torch.Generator | None = None) -> torch.Tensor:
    return fuse(inputs, generator)

