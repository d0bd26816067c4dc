"""The spherical family: interpolate on the hypersphere instead of along the chord.

slerp (two models, base first), nuslerp (two models, optionally around a base, t from the
weights), multislerp (any number, barycentric in a tangent space) and karcher (the weighted
Riemannian mean by fixed-point iteration).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch

from evomerge.methods.kernels import accumulation_dtype, weighted_sum
from evomerge.methods.registry import BasePolicy, Inputs, PerModel, Search, define

# Cosines closer to ±1 than this fall back to linear interpolation (mergekit's threshold).
SLERP_DOT_THRESHOLD = 0.9995


def slerp_coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> tuple[float, float]:
    """Slerp is (c0 * v0 + c1 * v1) once the angle is known: compute the two coefficients from
    the norms and the dot product (two reads, no temporaries). Near-parallel pairs lerp."""
    dtype = accumulation_dtype(v0.dtype)
    a, b = v0.reshape(-1), v1.reshape(-1)
    if a.numel() == 0:
        return 1 - t, t
    norm_a = torch.linalg.vector_norm(a, dtype=dtype).item()
    norm_b = torch.linalg.vector_norm(b, dtype=dtype).item()
    norm_a = norm_a if norm_a > eps else 1.0
    norm_b = norm_b if norm_b > eps else 1.0
    dot = torch.dot(a.to(dtype), b.to(dtype)).item() / (norm_a * norm_b)
    dot = max(-1.0, min(1.0, dot))
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return 1 - t, t
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return math.sin((1 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Spherical interpolation of two whole tensors; t=0 gives v0."""
    return weighted_sum((v0, v1), slerp_coefficients(t, v0, v1), out=out)


@define(base=BasePolicy.REQUIRED, min_inputs=2, max_inputs=2, reference="https://en.wikipedia.org/wiki/Slerp")
def slerp(inputs: Inputs, *, t: Annotated[float, Search(0.0, 1.0, per_layer=True)]) -> torch.Tensor:
    other = inputs.others[0]
    return slerp_tensors(t, inputs.base, other, out=inputs.out)


def nuslerp_tensors(
    t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool, eps: float = 1e-8
) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos_theta = (unit(v0) * unit(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def _nuslerp_flat_coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> tuple[float, float]:
    """nuslerp over the whole flattened tensor, as two coefficients (mergekit's formula)."""
    dtype = accumulation_dtype(v0.dtype)
    a, b = v0.reshape(-1).to(dtype), v1.reshape(-1).to(dtype)
    norm_a = max(torch.linalg.vector_norm(a).item(), 1e-7)
    norm_b = max(torch.linalg.vector_norm(b).item(), 1e-7)
    cos_theta = max(-1.0, min(1.0, torch.dot(a, b).item() / (norm_a * norm_b)))
    if 1 - cos_theta**2 <= eps**2:
        return 1 - t, t
    theta = math.acos(cos_theta)
    sin_theta = math.sin(theta)
    return math.sin((1 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


@define(base=BasePolicy.OPTIONAL, min_non_base=2, max_non_base=2)
def nuslerp(
    inputs: Inputs,
    *,
    weight: Annotated[PerModel, Search(0.0, 1.0, per_layer=True)],
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
) -> torch.Tensor:
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    base = inputs.base
    if base is not None:
        d0, d1 = inputs.task_vectors()
        if nuslerp_flatten:
            c0, c1 = _nuslerp_flat_coefficients(t, d0, d1)
            return weighted_sum((base, d0, d1), (1.0, c0, c1), out=inputs.out)
        return base + nuslerp_tensors(t, d0, d1, row_wise=nuslerp_row_wise, flatten=False)
    v0, v1 = inputs.others
    if nuslerp_flatten:
        return weighted_sum((v0, v1), _nuslerp_flat_coefficients(t, v0, v1), out=inputs.out)
    return nuslerp_tensors(t, v0, v1, row_wise=nuslerp_row_wise, flatten=False)


@define(base=BasePolicy.OPTIONAL, min_non_base=1, reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea")
def multislerp(
    inputs: Inputs,
    *,
    weight: Annotated[PerModel, Search(0.0, 1.0, per_layer=True)],
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere: project the unit inputs onto the tangent space
    at their weighted mean direction, average there, map back, rescale by the weighted mean norm.

    The result lies in the span of the inputs, so it is computed from their Gram matrix (k(k+1)/2
    dot products) and finished with one fused weighted sum: the same formula as mergekit's, without
    a full-size temporary per step.
    """
    others = inputs.others
    if len(others) == 1:
        return others[0]
    base = inputs.base
    vectors = list(inputs.task_vectors() if base is not None else others)
    dtype = accumulation_dtype(vectors[0].dtype)
    w = torch.tensor([float(x) for x in weight], dtype=torch.float64)
    if normalize_weights:
        w = w / w.sum()
    k = len(vectors)
    flat = [v.reshape(-1).to(dtype) for v in vectors]
    dots = torch.empty((k, k), dtype=torch.float64)
    for i in range(k):
        for j in range(i, k):
            dots[i, j] = dots[j, i] = torch.dot(flat[i], flat[j]).item()
    norms = dots.diagonal().clamp(min=0).sqrt()
    scale = 1 / (norms + eps)  # unit_i = v_i * scale_i
    gram = dots * scale[:, None] * scale[None, :]
    mean_norm = math.sqrt(max(float(w @ gram @ w), 0.0))
    if mean_norm < eps:
        if k != 2:
            raise ValueError(
                "multislerp: the weighted inputs cancel out (antipodal inputs with balancing weights); change the weights"
            )
        coefficients = w.tolist()  # fall back to linear interpolation
    else:
        alpha = w / mean_norm  # mean direction m = sum alpha_i unit_i
        along = gram @ alpha  # unit_i . m
        beta = w - float(w @ along) * alpha  # tangent T = sum w_i (unit_i - (unit_i . m) m)
        tangent_norm = math.sqrt(max(float(beta @ gram @ beta), 0.0)) + eps
        gamma = alpha * math.cos(tangent_norm) + beta * (math.sin(tangent_norm) / tangent_norm)
        coefficients = (gamma * float(norms @ w) * scale).tolist()
    if base is not None:
        return weighted_sum((base, *vectors), (1.0, *coefficients), out=inputs.out)
    return weighted_sum(vectors, coefficients, out=inputs.out)


def karcher_mean(tensors, alphas, *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Weighted Karcher (Fréchet) mean of the directions, scaled by the weighted mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = accumulation_dtype(tensors[0].dtype)
    norms = [torch.linalg.vector_norm(x.to(dtype)) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    points = [units[i] for i in valid]

    mean = torch.zeros_like(points[0])
    for w, u in zip(weights, points):
        mean += w * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = points[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, points):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(a * n for a, n in zip(alphas, norms))
    return scale * mean


@define(reference="https://arxiv.org/abs/2603.04972")
def karcher(inputs: Inputs, *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    n = len(inputs.tensors)
    return karcher_mean(list(inputs.tensors), [1.0 / n] * n, max_iter=max_iter, tol=tol)

