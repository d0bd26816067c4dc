"""The hand-written kernels and the method registry, tested directly (the oracle tests reach them only
through whole merges): selection equals torch's on every path, ties go to the lower index, the
chunked weighted sum equals the plain one, and the registry holds mergekit's 20 methods."""

from __future__ import annotations

import pytest
import torch

from evomerge.methods import kernels, registry
from evomerge.methods.kernels import kth_smallest, largest_mask, smallest_mask, weighted_sum


def _values(kind: str, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(n)
    if kind == "normal":
        return torch.randn(n, generator=generator)
    if kind == "sparse":  # a task vector after trimming: mostly zeros, a run of equal values
        values = torch.randn(n, generator=generator)
        values[torch.rand(n, generator=generator) < 0.7] = 0
        return values.abs()
    if kind == "few_levels":  # many ties everywhere
        return torch.randint(0, 5, (n,), generator=generator).float()
    raise ValueError(kind)


# sizes on either side of the sampling paths: exact kthvalue (small), 4K sample, 16K sample
SIZES = [1, 7, 1000, 1 << 15, (1 << 21) + 3]


@pytest.mark.parametrize("kind", ["normal", "sparse", "few_levels"])
@pytest.mark.parametrize("n", SIZES)
def test_kth_smallest_is_kthvalue_on_every_path(kind, n):
    values = _values(kind, n)
    for k in sorted({1, max(1, n // 10), max(1, n // 2), max(1, n - n // 100), n}):
        assert kth_smallest(values, k) == torch.kthvalue(values, k).values, (kind, n, k)


def test_kth_smallest_falls_back_when_the_sample_misses_the_bracket():
    """Values arranged so a strided sample sees only the large ones: the answer lies outside the bracket."""
    n = 1 << 16
    values = torch.ones(n)
    values[1::2] = torch.arange(n // 2, dtype=torch.float32) * -1.0  # odd slots, never sampled at even strides
    for k in (1, n // 4, n // 2 + 1):
        assert kth_smallest(values, k) == torch.kthvalue(values, k).values


def _reference_mask(values: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """k entries by a stable sort, equal values to the lower index."""
    order = torch.sort(-values if largest else values, stable=True).indices
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


@pytest.mark.parametrize("kind", ["normal", "sparse", "few_levels"])
@pytest.mark.parametrize("n", [10, 5000, 1 << 17])
def test_masks_select_exactly_k_with_ties_to_the_lower_index(kind, n):
    values = _values(kind, n)
    for k in (0, 1, n // 3, n // 2, n - 1, n):
        small, large = smallest_mask(values, k), largest_mask(values, k)
        assert int(small.sum()) == k and int(large.sum()) == k
        assert torch.equal(small, _reference_mask(values, k, largest=False)), (kind, n, k)
        assert torch.equal(large, _reference_mask(values, k, largest=True)), (kind, n, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_chunked_weighted_sum_is_the_plain_sum(dtype, monkeypatch):
    monkeypatch.setattr(kernels, "CPU_CHUNK_ELEMENTS", 1000)  # several chunks and a ragged last one
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(37, 101, generator=generator).to(dtype) for _ in range(3)]
    coefficients = [0.5, 0.0, -1.25]
    exact = sum(c * t.double() for c, t in zip(coefficients, tensors))  # then rounded once to the dtype
    expected = exact.to(dtype)
    got = weighted_sum(tensors, coefficients)
    assert got.dtype == dtype
    # accumulated in float32 (float64 stays float64): within one rounding of the exact sum
    torch.testing.assert_close(got, expected, rtol={torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 8e-3),
                               atol={torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2))
    out = torch.full_like(tensors[0], 7.0)
    assert weighted_sum(tensors, coefficients, out=out) is out and torch.equal(out, got)
    assert torch.equal(weighted_sum(tensors, [0.0, 0.0, 0.0]), torch.zeros_like(tensors[0]))
    with pytest.raises(ValueError, match="3 tensors but 2 coefficients"):
        weighted_sum(tensors, [1.0, 1.0])


MERGEKIT_METHODS = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "della_linear",
                    "breadcrumbs", "breadcrumbs_ties", "sce", "model_stock", "ram", "ramplus_tl", "multislerp",
                    "karcher", "slerp", "nuslerp", "nearswap", "arcee_fusion", "passthrough"}


def test_the_registry_holds_mergekits_20_methods_each_declared_once():
    import evomerge.methods  # noqa: F401 - registers every method

    assert set(registry.names()) == MERGEKIT_METHODS
    for name in registry.names():
        method = registry.get(name)
        assert method.name == name and callable(method.fn)
        assert len(method.param_names) == len(set(method.param_names)), name
        for param in method.searched:  # a searched parameter has a range the schema can sample
            assert param.search.low < param.search.high, (name, param.name)
    with pytest.raises(KeyError):
        registry.get("frankenmerge")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(registry.get("linear"))
