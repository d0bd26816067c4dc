"""The task-arithmetic family: one function, eight registered names.

    merged = base + lambda * combine(weight_i * sparsify(input_i - base, density_i))

`sparsify` is none (task_arithmetic), magnitude (ties), random (dare_*), magnitude with
outliers removed (breadcrumbs*) or DELLA's rank-dependent random drop (della*); `combine`
is a plain sum or TIES sign consensus. With `normalize` the sum is divided by the weights that
took part. Defaults per name are mergekit's.
"""

from __future__ import annotations

import torch

from evomerge.methods.kernels import largest_mask, smallest_mask
from evomerge.methods.registry import (
    BasePolicy,
    Inputs,
    MergeMethod,
    Param,
    Scope,
    in_range,
    register,
)

# mergekit's guard: norms below this are treated as zero and not rescaled.
_RESCALE_EPS = 1e-7


def _rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """Applies a keep-mask; with `rescale`, restores the L1 norm the mask removed."""
    kept = delta * mask
    if not rescale:
        return kept
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return kept
    return kept * (before / after)


def keep_largest(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """TIES trimming: keep the `density` fraction of entries with the largest magnitude."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = largest_mask(delta.abs().reshape(-1), k)
    return _rescaled(delta, mask.view_as(delta).to(delta.dtype), rescale)


def keep_middle(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Breadcrumbs: drop the `gamma` fraction of largest entries, then the smallest, keeping `density`."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - keep - n_top)  # shrink the outlier cut when density needs it
    magnitude = delta.abs().reshape(-1)
    # Ascending magnitude ranks [n_bottom, n_bottom + keep): drop the smallest and the outliers.
    mask = smallest_mask(magnitude, n_bottom + keep) & ~smallest_mask(magnitude, n_bottom)
    return _rescaled(delta, mask.view_as(delta).to(delta.dtype), rescale)


def keep_random(
    delta: torch.Tensor, density: float, rescale: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DARE: keep each entry with probability `density`."""
    if density >= 1:
        return delta
    probabilities = torch.full_like(delta, density)
    mask = torch.bernoulli(probabilities, generator=generator)
    return _rescaled(delta, mask, rescale)


def keep_random_by_rank(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA MagPrune: per row, keep probability grows linearly with magnitude rank,
    from density - epsilon (smallest) to density + epsilon (largest)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"della: density ± epsilon must stay inside (0, 1), got density={density:g}, epsilon={epsilon:g}"
        )
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(rows.dtype) + 1
    lowest = ranks.min(dim=1, keepdim=True).values
    highest = ranks.max(dim=1, keepdim=True).values
    position = ((ranks - lowest) / (highest - lowest)).clamp(0, 1)
    probabilities = (density - epsilon) + position * (2 * epsilon)
    mask = torch.bernoulli(probabilities, generator=generator)
    return _rescaled(rows, mask, rescale).reshape(delta.shape)


def sign_consensus(deltas: torch.Tensor) -> torch.Tensor:
    """TIES election: keep entries whose sign agrees with the sign of the summed deltas."""
    majority = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    return deltas.sign() == majority


def task_arithmetic_family(
    inputs: Inputs,
    *,
    weight,
    density,
    normalize: bool,
    rescale: bool,
    int8_mask: bool = False,  # accepted for mergekit compatibility: a memory option there, no effect on results
    gamma=None,
    epsilon=None,
    generator: torch.Generator | None = None,
    consensus: bool,
    sparsify: str | None,
    **shared,
) -> torch.Tensor:
    lam = shared["lambda"]
    base = inputs.base
    assert base is not None
    vectors = inputs.task_vectors()
    if not vectors:
        return base
    deltas = torch.empty((len(vectors), *base.shape), dtype=base.dtype, device=base.device)
    for i, delta in enumerate(vectors):
        if sparsify == "magnitude":
            delta = keep_largest(delta, density[i], rescale)
        elif sparsify == "random":
            delta = keep_random(delta, density[i], rescale, generator)
        elif sparsify == "magnitude_outliers":
            delta = keep_middle(delta, density[i], gamma[i], rescale)
        elif sparsify == "della_magprune":
            delta = keep_random_by_rank(delta, density[i], epsilon[i], rescale, generator)
        deltas[i] = delta
    weights = torch.tensor([float(w) for w in weight], dtype=deltas.dtype, device=deltas.device)
    weights = weights.view(-1, *([1] * base.dim()))
    deltas.mul_(weights)
    if consensus:
        mask = sign_consensus(deltas)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)


def family_coefficients(n_inputs: int, base_index: int | None, *, consensus: bool, sparsify: str | None, **params):
    """A plain weighted sum when nothing is dropped and no sign election happens."""
    if consensus:
        return None
    if sparsify is not None and any(d < 1 for d in params["density"]):
        return None
    weights = [float(w) for w in params["weight"]]
    scale = params["lambda"]
    if params["normalize"]:
        total = sum(weights)
        scale = scale / (total if abs(total) >= 1e-8 else 1.0)
    coefficients = iter([w * scale for w in weights])
    result = [0.0] * n_inputs
    for i in range(n_inputs):
        if i != base_index:
            result[i] = next(coefficients)
    # base + sum c_i (x_i - base) = (1 - sum c_i) base + sum c_i x_i
    result[base_index] = 1.0 - sum(result)
    return result


_DENSITY = in_range(0, 1, low_open=True)


def _register(name: str, *, consensus: bool, sparsify: str | None, normalize: bool, rescale: bool, reference: str):
    params = [
        Param("int8_mask", bool, default=False),
        Param("normalize", bool, default=normalize),
        Param("rescale", bool, default=rescale),
        Param("lambda", float, default=1.0),
        Param("weight", float, Scope.NON_BASE),
        Param("density", float, Scope.NON_BASE, default=1.0, check=_DENSITY),
    ]
    if sparsify == "magnitude_outliers":
        params.append(Param("gamma", float, Scope.NON_BASE, default=0.01, check=in_range(0, 1)))
    if sparsify == "della_magprune":
        params.append(Param("epsilon", float, Scope.NON_BASE, default=0.15, check=in_range(0, 1)))
    options = {"consensus": consensus, "sparsify": sparsify}

    def coefficients(n_inputs, base_index, **resolved):
        return family_coefficients(n_inputs, base_index, **options, **resolved)

    register(
        MergeMethod(
            name=name,
            fn=task_arithmetic_family,
            params=tuple(params),
            base=BasePolicy.REQUIRED,
            random=sparsify in ("random", "della_magprune"),
            coefficients=coefficients,
            reference=reference,
            options=options,
        )
    )


_register("task_arithmetic", consensus=False, sparsify=None, normalize=False, rescale=False,
          reference="https://arxiv.org/abs/2212.04089")
_register("ties", consensus=True, sparsify="magnitude", normalize=True, rescale=False,
          reference="https://arxiv.org/abs/2306.01708")
_register("dare_ties", consensus=True, sparsify="random", normalize=False, rescale=True,
          reference="https://arxiv.org/abs/2311.03099")
_register("dare_linear", consensus=False, sparsify="random", normalize=False, rescale=True,
          reference="https://arxiv.org/abs/2311.03099")
_register("breadcrumbs", consensus=False, sparsify="magnitude_outliers", normalize=False, rescale=False,
          reference="https://arxiv.org/abs/2312.06795")
_register("breadcrumbs_ties", consensus=True, sparsify="magnitude_outliers", normalize=False, rescale=False,
          reference="https://arxiv.org/abs/2312.06795")
_register("della", consensus=True, sparsify="della_magprune", normalize=True, rescale=True,
          reference="https://arxiv.org/abs/2406.11617")
_register("della_linear", consensus=False, sparsify="della_magprune", normalize=False, rescale=True,
          reference="https://arxiv.org/abs/2406.11617")
