"""The task-arithmetic family: one function, eight registered names.

    merged = base + lambda * combine(weight_i * sparsify(input_i - base, density_i))

`sparsify` is none (task_arithmetic), magnitude (ties), random (dare_*), magnitude with
outliers removed (breadcrumbs*) or DELLA's rank-dependent random drop (della*); `combine`
is a plain sum or TIES sign consensus. With `normalize` the sum is divided by the weights that
took part. Defaults per name are mergekit's.
"""

from __future__ import annotations

from typing import Annotated

import torch

from evomerge.methods.kernels import Workspace, largest_mask, masked, smallest_mask
from evomerge.methods.registry import BasePolicy, Inputs, PerModel, Search, define, in_range

# mergekit's guard: norms below this are treated as zero and not rescaled.
_RESCALE_EPS = 1e-7


def _finish(delta: torch.Tensor, kept: torch.Tensor, rescale: bool, magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """With `rescale`, scales the kept entries back to the L1 norm of the whole delta."""
    if not rescale:
        return kept
    before = (magnitude if magnitude is not None else delta.abs()).sum()
    after = kept.abs().sum()
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return kept
    return kept.mul_(before / after)


def _buffers(delta: torch.Tensor, out: torch.Tensor | None, workspace: Workspace | None):
    workspace = workspace or Workspace(persistent=False)
    return (out if out is not None else torch.empty_like(delta)), workspace


def keep_largest(delta, density: float, rescale: bool = False, *, out=None, workspace=None) -> torch.Tensor:
    """TIES trimming: keep the `density` fraction of entries with the largest magnitude."""
    if density >= 1:
        return delta
    out, ws = _buffers(delta, out, workspace)
    if density <= 0 or delta.numel() == 0:
        return out.zero_()
    k = max(1, int(density * delta.numel()))
    magnitude = torch.abs(delta, out=ws.get("magnitude", delta))
    keep = largest_mask(magnitude.view(-1), k, out=ws.get("keep", delta, torch.bool).view(-1))
    masked(delta, keep.view_as(delta), out, ws)
    return _finish(delta, out, rescale, magnitude)


def keep_middle(delta, density: float, gamma: float, rescale: bool = False, *, out=None, workspace=None) -> torch.Tensor:
    """Breadcrumbs: drop the `gamma` fraction of largest entries, then the smallest, keeping `density`."""
    if density >= 1:
        return delta
    out, ws = _buffers(delta, out, workspace)
    n = delta.numel()
    keep_count = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - keep_count - n_top)  # shrink the outlier cut when density needs it
    magnitude = torch.abs(delta, out=ws.get("magnitude", delta)).view(-1)
    # Ascending magnitude ranks [n_bottom, n_bottom + keep): the smallest n_bottom are a subset
    # of the smallest n_bottom + keep (one total order), so their exclusive-or is the band.
    upper = smallest_mask(magnitude, n_bottom + keep_count, out=ws.get("keep", delta, torch.bool).view(-1))
    lower = smallest_mask(magnitude, n_bottom, out=ws.get("keep_low", delta, torch.bool).view(-1))
    torch.logical_xor(upper, lower, out=upper)
    masked(delta, upper.view_as(delta), out, ws)
    return _finish(delta, out, rescale, magnitude.view_as(delta))


def keep_random(delta, density: float, rescale: bool = False, generator=None, *, out=None, workspace=None) -> torch.Tensor:
    """DARE: keep each entry with probability `density`."""
    if density >= 1:
        return delta
    out, ws = _buffers(delta, out, workspace)
    # uniform < p is Bernoulli(p), and ~4x faster on CPUs than torch.bernoulli.
    draws = torch.rand(delta.shape, generator=generator, dtype=delta.dtype, device=delta.device,
                       out=ws.get("draws", delta))
    keep = torch.lt(draws, density, out=ws.get("keep", delta, torch.bool))
    masked(delta, keep, out, ws)
    return _finish(delta, out, rescale)


def keep_random_by_rank(
    delta, density: float, epsilon: float, rescale: bool = False, generator=None, *, out=None, workspace=None
) -> torch.Tensor:
    """DELLA MagPrune: per row, keep probability grows linearly with magnitude rank,
    from density - epsilon (smallest) to density + epsilon (largest)."""
    if density >= 1:
        return delta
    out, ws = _buffers(delta, out, workspace)
    if density <= 0:
        return out.zero_()
    check_della(density, epsilon)
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    # 0-based magnitude rank within each row: one argsort, then its inverse permutation by scatter
    # (mergekit argsorts twice; same ranks).
    order = torch.argsort(rows.abs(), dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(rows.shape[1], device=rows.device).expand_as(order))
    del order
    probability = ws.get("probability", rows)
    torch.div(ranks, max(rows.shape[1] - 1, 1), out=probability)
    del ranks
    probability.clamp_(0, 1).mul_(2 * epsilon).add_(density - epsilon)
    draws = torch.rand(rows.shape, generator=generator, dtype=rows.dtype, device=rows.device,
                       out=ws.get("draws", rows))
    keep = torch.lt(draws, probability, out=ws.get("keep", rows, torch.bool))
    masked(rows, keep, out.view_as(rows), ws)
    return _finish(delta, out, rescale)


def della_room(density: float) -> float:
    """The largest epsilon DELLA allows at this density: density ± epsilon stays inside (0, 1)."""
    return min(density, 1 - density)


def check_della(density: float, epsilon: float) -> None:
    """DELLA's keep probabilities density ± epsilon must stay inside (0, 1)."""
    if epsilon >= della_room(density):
        raise ValueError(
            f"della: density ± epsilon must stay inside (0, 1), got density={density:g}, epsilon={epsilon:g}"
        )


def della_constrain(values: dict[str, list[float]]) -> dict[str, list[float]]:
    """A search proposes DELLA's epsilon as a fraction of the room that the model's density leaves
    at every layer (its smallest `della_room`): the recipe's epsilon is that fraction of the room."""
    if "epsilon" not in values:
        return values
    rooms = [della_room(d) for d in values.get("density", [1.0]) if d < 1]
    room = min(rooms) if rooms else 0.5
    return {**values, "epsilon": [round(max(1e-4, fraction * room * 0.999), 6) for fraction in values["epsilon"]]}


def sign_consensus(deltas: torch.Tensor) -> torch.Tensor:
    """TIES election: keep entries whose sign agrees with the sign of the summed deltas."""
    majority = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    return deltas.sign() == majority


def task_arithmetic_family(
    inputs: Inputs,
    *,
    int8_mask: bool = False,  # accepted for mergekit compatibility: a memory option there, no effect on results
    normalize: bool = False,
    rescale: bool = False,
    lambda_: Annotated[float, Search(0.5, 1.5)] = 1.0,
    weight: Annotated[PerModel, Search(0.0, 1.0, per_layer=True)],
    density: Annotated[PerModel, in_range(0, 1, low_open=True), Search(0.1, 1.0, per_layer=True)] = 1.0,
    gamma: Annotated[PerModel, in_range(0, 1), Search(0.0, 0.1, per_layer=True)] = 0.01,
    # searched as a fraction of the room the density leaves (della_constrain)
    epsilon: Annotated[PerModel, in_range(0, 1), Search(0.05, 0.95)] = 0.15,
    generator: torch.Generator | None = None,
    consensus: bool,
    sparsify: str | None,
) -> torch.Tensor:
    lam = lambda_
    base = inputs.base
    assert base is not None
    vectors = inputs.task_vectors()
    if not vectors:
        return base
    ws = inputs.workspace
    weighted = []  # weight_i * sparsify(delta_i), each in its own buffer (cached vectors stay intact)
    for i, delta in enumerate(vectors):
        buffer = ws.get(f"weighted{i}", delta)
        if sparsify == "magnitude":
            kept = keep_largest(delta, density[i], rescale, out=buffer, workspace=ws)
        elif sparsify == "random":
            kept = keep_random(delta, density[i], rescale, generator, out=buffer, workspace=ws)
        elif sparsify == "magnitude_outliers":
            kept = keep_middle(delta, density[i], gamma[i], rescale, out=buffer, workspace=ws)
        elif sparsify == "della_magprune":
            kept = keep_random_by_rank(delta, density[i], epsilon[i], rescale, generator, out=buffer, workspace=ws)
        else:
            kept = delta
        weighted.append(torch.mul(kept, float(weight[i]), out=buffer))
    mixed = ws.get("mixed", base)
    torch.add(weighted[0], weighted[1], out=mixed) if len(weighted) > 1 else mixed.copy_(weighted[0])
    for delta in weighted[2:]:
        mixed += delta
    if consensus:
        # Elected sign: +1 where the sum is >= 0, else -1.
        majority = torch.sign(mixed, out=ws.get("majority", base)).add_(0.5).sign_()
        mixed.zero_()
        divisor = ws.get("divisor", base).zero_()
        agreeing, kept = ws.get("agreeing", base), ws.get("kept", base)
        for delta, w in zip(weighted, weight):
            # relu(delta * m) * m is delta where its sign is the elected one, else 0 (x ±1 is exact).
            torch.mul(delta, majority, out=kept).clamp_(min=0)
            divisor.add_(torch.sign(kept, out=agreeing), alpha=float(w))
            mixed += kept.mul_(majority)
        divisor.masked_fill_(divisor == 0, 1)
    else:
        total = sum(float(w) for w in weight)
        divisor = total if abs(total) >= 1e-8 else 1.0
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return torch.add(base, mixed, out=inputs.output(base))


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


def _define(name: str, *, consensus: bool, sparsify: str | None, normalize: bool, rescale: bool, reference: str):
    options = {"consensus": consensus, "sparsify": sparsify}

    def coefficients(n_inputs, base_index, **resolved):
        return family_coefficients(n_inputs, base_index, **options, **resolved)

    define(
        task_arithmetic_family,
        name=name,
        defaults={"normalize": normalize, "rescale": rescale},
        skip=[p for p, used in (("gamma", sparsify == "magnitude_outliers"),
                                ("epsilon", sparsify == "della_magprune")) if not used],
        unsearched=["density"] if sparsify is None else [],  # accepted, but nothing is dropped
        base=BasePolicy.REQUIRED,
        random=sparsify in ("random", "della_magprune"),
        coefficients=coefficients,
        constrain=della_constrain if sparsify == "della_magprune" else None,
        reference=reference,
        options=options,
    )


# name, TIES sign election, sparsification, normalize and rescale defaults (mergekit's), paper
FAMILY = (
    ("task_arithmetic", False, None, False, False, "2212.04089"),
    ("ties", True, "magnitude", True, False, "2306.01708"),
    ("dare_ties", True, "random", False, True, "2311.03099"),
    ("dare_linear", False, "random", False, True, "2311.03099"),
    ("breadcrumbs", False, "magnitude_outliers", False, False, "2312.06795"),
    ("breadcrumbs_ties", True, "magnitude_outliers", False, False, "2312.06795"),
    ("della", True, "della_magprune", True, True, "2406.11617"),
    ("della_linear", False, "della_magprune", False, True, "2406.11617"),
)
for _name, _consensus, _sparsify, _normalize, _rescale, _paper in FAMILY:
    _define(_name, consensus=_consensus, sparsify=_sparsify, normalize=_normalize, rescale=_rescale,
            reference=f"https://arxiv.org/abs/{_paper}")
