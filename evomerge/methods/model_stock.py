"""model_stock: move from the base towards the average of the fine-tunes by an amount set by
how much their task vectors agree (Jang et al., Model Stock)."""

from __future__ import annotations

import torch

from evomerge.methods.registry import BasePolicy, Inputs, MergeMethod, Param, register


def model_stock(inputs: Inputs, *, filter_wise: bool = False) -> torch.Tensor:
    base = inputs.base
    others = inputs.others
    shape = base.shape
    vectors = inputs.task_vectors()
    if filter_wise:
        if base.dim() == 1:
            base = base.unsqueeze(0)
            others = tuple(x.unsqueeze(0) for x in others)
            vectors = tuple(v.unsqueeze(0) for v in vectors)
    else:
        base = base.reshape(-1)
        others = tuple(x.reshape(-1) for x in others)
        vectors = tuple(v.reshape(-1) for v in vectors)

    cosines = []
    for i, a in enumerate(vectors):
        for b in vectors[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(others)
    denominator = 1 + (count - 1) * cos_theta
    # No finite interpolation at the singularity: keep the base there.
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_theta), count * cos_theta / torch.where(singular, 1, denominator))
    average = sum(others) / count
    return (t * average + (1 - t) * base).reshape(shape)


register(
    MergeMethod(
        name="model_stock",
        fn=model_stock,
        params=(Param("filter_wise", bool, default=False),),
        base=BasePolicy.REQUIRED,
        min_inputs=3,
        reference="https://arxiv.org/abs/2403.19522",
    )
)
