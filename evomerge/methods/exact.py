"""mergekit 0.1.5's arithmetic, operation for operation: the `--mergekit-exact` variants.

evomerge's methods accumulate in float32 and round once. mergekit computes most methods in the
recipe's dtype (bfloat16 for most published merges), rounding after every operation, and ranks
magnitudes with torch's unstable sort. A published merge is reproduced bit for bit only by
the same operations in the same order on the same dtypes, which is what this module holds: for
each method whose default arithmetic differs, a variant that receives the inputs in the recipe's
dtype and performs mergekit's sequence of torch operations (written from reading its source, not
copied). karcher, ram, ramplus_tl and passthrough need none: their own functions
already are mergekit's sequence, and given 16-bit inputs (no fused sum, no cached task vectors)
they give its bits. nuslerp, sce, model_stock and arcee_fusion reuse their own modules' pieces and
differ only where mergekit's operations do (no fused sum, torch.var and topk, a float32 mask). The
engine calls them when asked for mergekit-exact merges; `docs/methods.md` lists the differences each
removes and their size.

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
from evomerge.methods.kernels import accumulation_dtype
from evomerge.methods.model_stock import model_stock, stock_rows
from evomerge.methods.registry import Inputs, attach_exact
from evomerge.methods.sce import select_erase_average
from evomerge.methods.spherical import nuslerp_tensors
from evomerge.methods.task_arithmetic import check_della, sign_consensus

# --------------------------------------------------------------------------- linear


@attach_exact("linear")
def linear_exact(inputs: Inputs, *, weight, normalize: bool = True) -> torch.Tensor:
    """A batch of one output: weights as a [1, n] float32 row, products added into a float32 zero
    tensor in model order (addcmul), divided by the summed weights, rounded to the inputs' dtype."""
    first = inputs.tensors[0]
    if not first.is_floating_point():
        raise TypeError("linear merging needs floating-point tensors")
    wide = accumulation_dtype(first.dtype)
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
    wide = accumulation_dtype(v0.dtype)
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    tt = torch.tensor([float(t)], dtype=wide, device=v0.device).reshape(-1, 1)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    spans = range(0, a.shape[1], _SLERP_CHUNK)

    def chunk(x: torch.Tensor, start: int) -> torch.Tensor:  # converted per pass, as mergekit bounds scratch
        return x[:, start:start + _SLERP_CHUNK].to(wide)

    norms_a = [torch.linalg.vector_norm(chunk(a, s), dim=1, keepdim=True) for s in spans]
    norms_b = [torch.linalg.vector_norm(chunk(b, s), dim=1, keepdim=True) for s in spans]
    norm_a = torch.linalg.vector_norm(torch.stack(norms_a), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(norms_b), dim=0)
    norm_a = torch.where(norm_a > 1e-8, norm_a, 1)
    norm_b = torch.where(norm_b > 1e-8, norm_b, 1)
    dots = [((chunk(a, s) / norm_a) * (chunk(b, s) / norm_b)).sum(dim=1, keepdim=True) for s in spans]
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    near_linear = dot.abs() > 0.9995
    theta = torch.acos(torch.where(near_linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(near_linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(near_linear, tt, torch.sin(tt * theta) / sin_theta)
    result = torch.empty_like(a)
    for s in spans:
        result[:, s:s + _SLERP_CHUNK] = coef_a * chunk(a, s) + coef_b * chunk(b, s)
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
    others = list(inputs.others)
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
    check_della(density, epsilon)
    shape = delta.shape
    work = _random_dtype(delta)
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    probability = (density - epsilon) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * epsilon
    mask = torch.bernoulli(probability, generator=generator).to(work)
    return _masked_rescaled(rows.to(work), mask, rescale).to(delta.dtype).reshape(shape)


def task_arithmetic_exact(
    inputs: Inputs, *, int8_mask: bool = False, normalize: bool, rescale: bool, lambda_: float, weight,
    density, gamma=None, epsilon=None, generator=None, consensus: bool, sparsify: str | None,
) -> torch.Tensor:
    """Deltas sparsified one by one into a stack in the inputs' dtype, weights rounded to that dtype
    and multiplied in, the sign election (TIES), the sum over models, the divisor, lambda."""
    base = inputs.base
    others = list(inputs.others)
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
        mask = sign_consensus(deltas)  # the same booleans as mergekit's mask, whatever int8_mask says
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
    """evomerge's SCE with mergekit's selection (torch.var, topk); int8_mask only changes the dtype
    of mergekit's masks, never the values they select."""
    return select_erase_average(inputs, select_topk, _variance_mask)


def _variance_mask(vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    if fraction <= 0:
        return torch.zeros_like(vectors[0])
    variance = torch.var(vectors, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * fraction)
    mask = torch.zeros_like(variance)
    if k:
        mask.view(-1)[torch.topk(variance.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


# --------------------------------------------------------------------------- the others


@attach_exact("model_stock")
def model_stock_exact(inputs: Inputs, *, filter_wise: bool = False) -> torch.Tensor:
    """mergekit flattens each tensor and takes one t along it (evomerge's default finishes with a
    fused sum); filter-wise, evomerge's rows already are mergekit's sequence."""
    if filter_wise:
        return model_stock(inputs, filter_wise=True)
    others = tuple(x.reshape(-1) for x in inputs.others)
    vectors = tuple(v.reshape(-1) for v in inputs.task_vectors())
    return stock_rows(inputs.base.reshape(-1), others, vectors).reshape(inputs.base.shape)


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
