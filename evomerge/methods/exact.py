"""mergekit 0.1.5's arithmetic, operation for operation: the `--mergekit-exact` variants.

evomerge's methods accumulate in float32 and round once. mergekit computes most methods in the
recipe's dtype (bfloat16 for most published merges), rounding after every operation, and ranks
magnitudes with torch's unstable sort. A published merge is reproduced bit for bit only by
the same operations in the same order on the same dtypes, which is what this module holds: for
each method whose default arithmetic differs, a variant that receives the inputs in the recipe's
dtype and performs mergekit's sequence of torch operations (written from reading its source, not
copied). karcher, ram, ramplus_tl and passthrough need none: their own functions
already are mergekit's sequence, and given 16-bit inputs (no fused sum, no cached task vectors)
they give its bits. The engine calls them when asked for mergekit-exact merges; `docs/methods.md` lists the
differences each removes and their size.

Two things stay apart by design: the random methods draw from evomerge's per-tensor generator
(mergekit draws from torch's global generator in its task order), so DARE, DELLA and
arcee_fusion's quantile sampling (tensors above 1M entries) agree in distribution, not bit for
bit; and a method whose result mergekit leaves in float32 (arcee_fusion) is rounded to the
output dtype here, as loading mergekit's checkpoint in that dtype rounds it.

Every variant takes the method's resolved parameters (as its default function does) and returns
the merged tensor; inputs are never modified.
"""

from __future__ import annotations

import torch

from evomerge.methods.arcee_fusion import fuse
from evomerge.methods.registry import Inputs, attach_exact
from evomerge.methods.spherical import nuslerp_tensors


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype mergekit's batched kernels (linear, slerp) and karcher work in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _non_base(inputs: Inputs) -> list[torch.Tensor]:
    return list(inputs.others)


# --------------------------------------------------------------------------- linear


@attach_exact("linear")
def linear_exact(inputs: Inputs, *, weight, normalize: bool = True) -> torch.Tensor:
    """A batch of one output: weights as a [1, n] float32 row, products added into a float32 zero
    tensor in model order (addcmul), divided by the summed weights, rounded to the inputs' dtype."""
    first = inputs.tensors[0]
    if not first.is_floating_point():
        raise TypeError("linear merging needs floating-point tensors")
    wide = _wide(first.dtype)
    weights = torch.tensor([[float(w) for w in weight]], dtype=wide, device=first.device)
    shape = (1,) * (first.dim() + 1)
    result = torch.zeros((1, *first.shape), dtype=wide, device=first.device)
    for tensor, coefficient in zip(inputs.tensors, weights.unbind(1)):
        result.addcmul_(tensor.unsqueeze(0), coefficient.reshape(shape))
    if normalize:
        result.div_(weights.sum(dim=1).reshape(shape))
    return result.to(first.dtype)[0]


# --------------------------------------------------------------------------- spherical

_SLERP_CHUNK = 1024 * 1024  # mergekit's chunk of elements per output for norms and dot products


@attach_exact("slerp")
def slerp_exact(inputs: Inputs, *, t: float) -> torch.Tensor:
    """Base first, a batch of one: float32 norms per 1M-element chunk, combined as a norm of norms;
    a chunked dot product of the normalised inputs; coefficients from the angle (linear when the
    inputs are nearly collinear); the result written chunk by chunk into the inputs' dtype."""
    v0 = inputs.base
    v1 = inputs.others[0]
    wide = _wide(v0.dtype)
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    tt = torch.tensor([float(t)], dtype=wide, device=v0.device).reshape(-1, 1)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    spans = range(0, a.shape[1], _SLERP_CHUNK)
    norms_a = [torch.linalg.vector_norm(a[:, s:s + _SLERP_CHUNK].to(wide), dim=1, keepdim=True) for s in spans]
    norms_b = [torch.linalg.vector_norm(b[:, s:s + _SLERP_CHUNK].to(wide), dim=1, keepdim=True) for s in spans]
    norm_a = torch.linalg.vector_norm(torch.stack(norms_a), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(norms_b), dim=0)
    norm_a = torch.where(norm_a > 1e-8, norm_a, 1)
    norm_b = torch.where(norm_b > 1e-8, norm_b, 1)
    dots = [
        ((a[:, s:s + _SLERP_CHUNK].to(wide) / norm_a) * (b[:, s:s + _SLERP_CHUNK].to(wide) / norm_b)).sum(dim=1, keepdim=True)
        for s in spans
    ]
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    near_linear = dot.abs() > 0.9995
    theta = torch.acos(torch.where(near_linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(near_linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(near_linear, tt, torch.sin(tt * theta) / sin_theta)
    result = torch.empty_like(a)
    for s in spans:
        result[:, s:s + _SLERP_CHUNK] = coef_a * a[:, s:s + _SLERP_CHUNK].to(wide) + coef_b * b[:, s:s + _SLERP_CHUNK].to(wide)
    return result.reshape(v0.shape)


@attach_exact("nuslerp")
def nuslerp_exact(inputs: Inputs, *, weight, nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True) -> torch.Tensor:
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    v0, v1 = inputs.others
    base = inputs.base
    # evomerge's own nuslerp_tensors is mergekit's sequence; the default path fuses the flattened case
    if base is None:
        return nuslerp_tensors(t, v0, v1, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
    return base + nuslerp_tensors(t, v0 - base, v1 - base, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)


@attach_exact("multislerp")
def multislerp_exact(inputs: Inputs, *, weight, normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    others = _non_base(inputs)
    base = inputs.base
    if len(others) == 1:
        return others[0]
    stacked = torch.stack(others, dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    weights = torch.tensor([float(w) for w in weight], dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] == 2:
            result = (stacked[0] * weights[0] + stacked[1] * weights[1]).view(stacked.shape[1:])
            return result + base if base is not None else result
        raise ValueError("multislerp: the weighted sum of the inputs is zero (antipodal inputs with balancing weights)")
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangents = units - dots * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = result * (norms.squeeze(-1) * weights).sum()
    result = result.view(stacked.shape[1:])
    return result + base if base is not None else result


# --------------------------------------------------------------------------- task arithmetic family


def _masked_rescaled(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    kept = tensor * mask
    if not rescale:
        return kept
    before = tensor.abs().sum()
    after = kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def _cpu_float(values: torch.Tensor) -> torch.Tensor:
    """mergekit ranks magnitudes in float32 on the CPU (16-bit sorts are slow there)."""
    return values.float() if values.device.type == "cpu" else values


def _keep_largest(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.argsort(_cpu_float(delta.abs().reshape(-1)), descending=True)[:k]] = 1
    return _masked_rescaled(delta, mask.reshape_as(delta), rescale)


def _keep_middle(delta: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n)
    bottom = max(0, n - keep - int(gamma * n))
    order = torch.sort(_cpu_float(delta.abs().reshape(-1)), descending=False).indices
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[bottom:bottom + keep]] = 1
    return _masked_rescaled(delta, mask.reshape_as(delta), rescale)


def _random_dtype(delta: torch.Tensor) -> torch.dtype:
    """mergekit draws in the delta's dtype, but in float32 for CPU float16/float32/float64 inputs."""
    return delta.dtype if delta.device.type != "cpu" or delta.dtype == torch.bfloat16 else torch.float32


def _keep_random(delta: torch.Tensor, density: float, rescale: bool, generator) -> torch.Tensor:
    if density >= 1:
        return delta
    work = _random_dtype(delta)
    mask = torch.bernoulli(torch.full_like(delta, density, dtype=work), generator=generator)
    return _masked_rescaled(delta.to(work), mask, rescale).to(delta.dtype)


def _keep_random_by_rank(delta: torch.Tensor, density: float, epsilon: float, rescale: bool, generator) -> torch.Tensor:
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"della: density ± epsilon must stay inside (0, 1), got density={density:g}, epsilon={epsilon:g}")
    shape = delta.shape
    work = _random_dtype(delta)
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    probability = (density - epsilon) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * epsilon
    mask = torch.bernoulli(probability, generator=generator).to(work)
    return _masked_rescaled(rows.to(work), mask, rescale).to(delta.dtype).reshape(shape)


def sign_mask(deltas: torch.Tensor, mask_dtype: torch.dtype) -> torch.Tensor:
    """TIES's election as mergekit computes it: signs in `mask_dtype` against the sign of the sum."""
    signs = deltas.sign().to(mask_dtype)
    majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return signs == majority


def task_arithmetic_exact(
    inputs: Inputs, *, int8_mask: bool = False, normalize: bool, rescale: bool, lambda_: float, weight,
    density, gamma=None, epsilon=None, generator=None, consensus: bool, sparsify: str | None,
) -> torch.Tensor:
    """Deltas sparsified one by one into a stack in the inputs' dtype, weights rounded to that dtype
    and multiplied in, the sign election (TIES), the sum over models, the divisor, lambda."""
    base = inputs.base
    others = _non_base(inputs)
    if not others:
        return base
    deltas = base.new_empty((len(others), *base.shape))
    for i, tensor in enumerate(others):
        delta = tensor - base
        if sparsify == "magnitude":
            delta = _keep_largest(delta, density[i], rescale)
        elif sparsify == "random":
            delta = _keep_random(delta, density[i], rescale, generator)
        elif sparsify == "magnitude_outliers":
            delta = _keep_middle(delta, density[i], gamma[i], rescale)
        elif sparsify == "della_magprune":
            delta = _keep_random_by_rank(delta, density[i], epsilon[i], rescale, generator)
        deltas[i] = delta
    weights = torch.tensor([float(w) for w in weight], dtype=deltas.dtype, device=deltas.device)
    weights = weights.reshape(-1, *([1] * base.dim()))
    deltas.mul_(weights)
    if consensus:
        mask = sign_mask(deltas, torch.int8 if int8_mask else base.dtype)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(base.dtype)


for _name in ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
              "della_linear"):
    attach_exact(_name)(task_arithmetic_exact)


@attach_exact("sce")
def sce_exact(inputs: Inputs, *, int8_mask: bool = False, select_topk: float = 1.0) -> torch.Tensor:
    base = inputs.base
    others = _non_base(inputs)
    if not others:
        return base
    mask_dtype = torch.int8 if int8_mask else base.dtype
    vectors = torch.stack([t - base for t in others], dim=0)
    if select_topk < 1:
        vectors = vectors * _variance_mask(vectors, select_topk, mask_dtype).unsqueeze(0)
    keep = sign_mask(vectors, mask_dtype)
    energy = vectors.square().reshape(vectors.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    energy = torch.ones_like(energy) / energy.shape[0] if abs(total) < 1e-6 else energy / total
    energy = energy.reshape(-1, *([1] * base.dim()))
    kept = energy * keep
    return base + (vectors * kept).sum(dim=0) / torch.sum(kept, dim=0).clamp(min=1e-6)


def _variance_mask(vectors: torch.Tensor, fraction: float, mask_dtype: torch.dtype) -> torch.Tensor:
    if fraction <= 0:
        return torch.zeros_like(vectors[0], dtype=mask_dtype)
    variance = torch.var(vectors, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * fraction)
    mask = torch.zeros_like(variance, dtype=mask_dtype)
    if k:
        mask.view(-1)[torch.topk(variance.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


# --------------------------------------------------------------------------- the others


@attach_exact("model_stock")
def model_stock_exact(inputs: Inputs, *, filter_wise: bool = False) -> torch.Tensor:
    base = inputs.base
    others = _non_base(inputs)
    shape = base.shape
    if filter_wise:
        if base.dim() == 1:
            base, others = base.unsqueeze(0), [w.unsqueeze(0) for w in others]
    else:
        base, others = base.reshape(-1), [w.reshape(-1) for w in others]
    offsets = [w - base for w in others]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(others)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
    average = sum(others) / count
    return (t * average + (1 - t) * base).reshape(shape)


@attach_exact("nearswap")
def nearswap_exact(inputs: Inputs, *, t: float) -> torch.Tensor:
    a, b = inputs.base, inputs.others[0]
    weight = (t / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


@attach_exact("arcee_fusion")
def arcee_fusion_exact(inputs: Inputs, *, generator=None) -> torch.Tensor:
    """evomerge's arcee_fusion with mergekit's float32 mask, which leaves a 16-bit result in float32
    (kept when out_dtype is float32; rounded to the output dtype otherwise, to the same bits)."""
    return fuse(inputs, generator, torch.float32)
