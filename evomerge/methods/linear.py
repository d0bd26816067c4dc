"""linear: a weighted average of the inputs (Wortsman et al., model soups)."""

from __future__ import annotations

from typing import Annotated

import torch

from evomerge.methods.kernels import weighted_sum
from evomerge.methods.registry import Inputs, PerInput, Search, define


def linear_coefficients(n_inputs: int, base_index: int | None, *, weight, normalize: bool = True) -> list[float]:
    weights = [float(w) for w in weight]
    if normalize:
        total = sum(weights)
        # mergekit divides by the raw sum (a zero sum gives inf/NaN, which fails the merge check).
        return [w / total if total != 0 else w * float("inf") for w in weights]
    return weights


@define(coefficients=linear_coefficients, reference="https://arxiv.org/abs/2203.05482")
def linear(
    inputs: Inputs, *, weight: Annotated[PerInput, Search(0.0, 1.0, per_layer=True)], normalize: bool = True
) -> torch.Tensor:
    if not inputs.tensors[0].is_floating_point():
        raise TypeError("linear merging needs floating-point tensors")
    coefficients = linear_coefficients(len(inputs.tensors), inputs.base_index, weight=weight, normalize=normalize)
    return weighted_sum(inputs.tensors, coefficients)

