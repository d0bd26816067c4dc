"""passthrough: copy one input unchanged (optionally scaled); with slices it stacks layers."""

from __future__ import annotations

import torch

from evomerge.methods.registry import Inputs, MergeMethod, Param, Scope, register


def passthrough_coefficients(n_inputs: int, base_index: int | None, *, scale) -> list[float]:
    return [1.0 if s is None else float(s) for s in scale]


def passthrough(inputs: Inputs, *, scale) -> torch.Tensor:
    (x,) = inputs.tensors
    return x if scale[0] is None else x * scale[0]


register(
    MergeMethod(
        name="passthrough",
        fn=passthrough,
        params=(Param("scale", float, Scope.INPUT, default=None),),
        max_inputs=1,
        coefficients=passthrough_coefficients,
    )
)
