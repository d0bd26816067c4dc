"""nearswap: take the other model's value where it is close to the base (|a - b| < t), and
interpolate towards it by t / |a - b| elsewhere."""

from __future__ import annotations

import torch

from evomerge.methods.registry import BasePolicy, Inputs, MergeMethod, Param, register


def nearswap(inputs: Inputs, *, t: float) -> torch.Tensor:
    a = inputs.base
    (b,) = inputs.others
    ws = inputs.workspace
    difference = torch.sub(b, a, out=ws.get("difference", a))
    # weight = clamp(t / max(|b - a|, 1e-6), 0, 1); result = a + weight * (b - a)
    weight = torch.abs(difference, out=ws.get("weight", a)).clamp_(min=1e-6).reciprocal_().mul_(t).clamp_(0, 1)
    return torch.addcmul(a, weight, difference, out=inputs.output(a))


register(
    MergeMethod(
        name="nearswap",
        fn=nearswap,
        params=(Param("t", float),),
        base=BasePolicy.REQUIRED,
        min_inputs=2,
        max_inputs=2,
        reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    )
)
