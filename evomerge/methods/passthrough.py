"""passthrough: copy one input unchanged (optionally scaled); with slices it stacks layers."""

from __future__ import annotations

from typing import Annotated, Optional, Sequence

import torch

from evomerge.methods.registry import Inputs, Scope, define


def passthrough_coefficients(n_inputs: int, base_index: int | None, *, scale) -> list[float]:
    return [1.0 if s is None else float(s) for s in scale]


@define(max_inputs=1, coefficients=passthrough_coefficients)
def passthrough(inputs: Inputs, *, scale: Annotated[Sequence[Optional[float]], Scope.INPUT] = None) -> torch.Tensor:
    (x,) = inputs.tensors
    return x if scale[0] is None else x * scale[0]

