"""model_stock: move from the base towards the average of the fine-tunes by an amount set by
how much their task vectors agree (Jang et al., Model Stock)."""

from __future__ import annotations

import torch

from evomerge.methods.kernels import weighted_sum
from evomerge.methods.registry import BasePolicy, Inputs, define


def _interpolation_ratio(cos_theta: torch.Tensor, count: int) -> torch.Tensor:
    """Model Stock's t = k cos / (1 + (k - 1) cos); at the singularity keep the base (t = 0)."""
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos_theta), count * cos_theta / torch.where(singular, 1, denominator))


def _mean_pairwise_cosine(vectors, dim: int | None) -> torch.Tensor:
    cosines = []
    for i, a in enumerate(vectors):
        for b in vectors[i + 1 :]:
            if dim is None:
                norms = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)
                dot = torch.dot(a.reshape(-1), b.reshape(-1))
            else:
                norms = torch.norm(a, dim=dim) * torch.norm(b, dim=dim)
                dot = (a * b).sum(dim=dim)
            cosines.append((dot / norms.clamp(min=1e-6)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0)


@define(base=BasePolicy.REQUIRED, min_inputs=3, reference="https://arxiv.org/abs/2403.19522")
def model_stock(inputs: Inputs, *, filter_wise: bool = False) -> torch.Tensor:
    base = inputs.base
    others = inputs.others
    vectors = inputs.task_vectors()
    count = len(others)
    if not filter_wise:
        # One t for the whole tensor: the result is t * mean(others) + (1 - t) * base, a fused sum.
        t = _interpolation_ratio(_mean_pairwise_cosine(vectors, None), count).item()
        coefficients = [t / count if i != inputs.base_index else 1 - t for i in range(len(inputs.tensors))]
        return weighted_sum(inputs.tensors, coefficients, out=inputs.out)
    shape = base.shape
    if base.dim() == 1:
        base = base.unsqueeze(0)
        others = tuple(x.unsqueeze(0) for x in others)
        vectors = tuple(v.unsqueeze(0) for v in vectors)
    return stock_rows(base, others, vectors).reshape(shape)


def stock_rows(base: torch.Tensor, others, vectors) -> torch.Tensor:
    """Model Stock with one t per row (the last dimension), in mergekit's sequence of operations:
    the mean pairwise cosine of the task vectors, t, then t * mean(others) + (1 - t) * base."""
    count = len(others)
    t = _interpolation_ratio(_mean_pairwise_cosine(vectors, -1).unsqueeze(-1), count)
    average = sum(others) / count
    return t * average + (1 - t) * base

