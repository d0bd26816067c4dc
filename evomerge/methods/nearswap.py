"""nearswap: take the other model's value where it is close to the base (|a - b| < t), and
interpolate towards it by t / |a - b| elsewhere."""

from __future__ import annotations

import torch

from evomerge.methods.registry import BasePolicy, Inputs, MergeMethod, Param, register


def nearswap(inputs: Inputs, *, t: float) -> torch.Tensor:
    a = inputs.base
    (b,) = inputs.others
    weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


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
