"""RAM (Reinforced Agent Merging): entries changed by one model keep that change; entries
changed by several are averaged over the models that changed them. ramplus_tl boosts each
model's unique entries by how much it overlaps with the others (tensor-local RAM+)."""

from __future__ import annotations

from typing import Annotated

import torch

from evomerge.methods.registry import BasePolicy, Inputs, Search, define

# The threshold below which a change counts as none: searched on a log scale around mergekit's default.
Epsilon = Annotated[float, Search(1e-6, 1e-3, log=True)]


def _contributions(inputs: Inputs, epsilon: float):
    vectors = torch.stack(inputs.task_vectors()).view(len(inputs.others), -1)
    changed = vectors.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return vectors * changed, changed, counts, counts > 1, counts == 1


@define(base=BasePolicy.REQUIRED, reference="https://arxiv.org/abs/2601.13572")
def ram(inputs: Inputs, *, epsilon: Epsilon = 1e-5) -> torch.Tensor:
    base = inputs.base
    if not inputs.others:
        return base
    vectors, _changed, counts, shared, unique = _contributions(inputs, epsilon)
    merged = (vectors * unique + vectors * shared / counts.clamp(min=1)).sum(dim=0)
    return base + merged.view_as(base)


@define(base=BasePolicy.REQUIRED, reference="https://arxiv.org/abs/2601.13572")
def ramplus_tl(
    inputs: Inputs,
    *,
    r: Annotated[float, Search(0.0, 0.5)] = 0.1,
    alpha: Annotated[float, Search(0.0, 0.5)] = 0.2,
    epsilon: Epsilon = 1e-5,
) -> torch.Tensor:
    base = inputs.base
    if not inputs.others:
        return base
    vectors, changed, counts, shared, unique = _contributions(inputs, epsilon)
    rho = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=epsilon)
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    merged = (vectors * unique * boost.unsqueeze(-1) + vectors * shared / counts.clamp(min=1)).sum(dim=0)
    return base + merged.view_as(base)

