"""nearswap: take the other model's value where it is close to the base (|a - b| < t), and
interpolate towards it by t / |a - b| elsewhere."""

from __future__ import annotations

from typing import Annotated

import torch

from evomerge.methods.registry import BasePolicy, Inputs, Search, define


@define(base=BasePolicy.REQUIRED, min_inputs=2, max_inputs=2,
        reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001")
def nearswap(inputs: Inputs, *, t: Annotated[float, Search(1e-4, 1e-1, log=True, per_layer=True)]) -> torch.Tensor:
    a = inputs.base
    (b,) = inputs.others
    ws = inputs.workspace
    difference = torch.sub(b, a, out=ws.get("difference", a))
    # weight = clamp(t / max(|b - a|, 1e-6), 0, 1); result = a + weight * (b - a)
    weight = torch.abs(difference, out=ws.get("weight", a)).clamp_(min=1e-6).reciprocal_().mul_(t).clamp_(0, 1)
    return torch.addcmul(a, weight, difference, out=inputs.output(a))

