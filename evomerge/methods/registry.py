"""The method registry: a merge method is a pure tensor function plus a small spec.

A method receives the tensors of one output weight (an `Inputs` bundle) and its
resolved parameters, and returns the merged tensor. It does no I/O and knows nothing
about recipes, models or the search; the engine resolves parameters and places tensors.
Semantics and defaults follow mergekit 0.1.5 so a recipe means the same in both tools.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from evomerge.methods.kernels import Workspace


class Scope(enum.Enum):
    SHARED = "shared"  # one value for the whole tensor (e.g. `t`, `normalize`)
    INPUT = "input"  # one value per input model, the base included (e.g. linear `weight`)
    NON_BASE = "non_base"  # one value per non-base input (e.g. ties `weight`, `density`)


class BasePolicy(enum.Enum):
    REQUIRED = "required"  # the base model is an input with a special role
    OPTIONAL = "optional"  # used as origin when given (nuslerp, multislerp)
    IGNORED = "ignored"  # a base_model, if given, is just one more input (linear, karcher)


REQUIRED = object()  # marks a parameter without default


@dataclass(frozen=True)
class Param:
    name: str
    type: type  # float, int or bool; `None` allowed when default is None
    scope: Scope = Scope.SHARED
    default: Any = REQUIRED
    # Returns an error message for an out-of-range value, or None when fine.
    check: Callable[[Any], str | None] | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any) -> Any:
        """Validate one scalar the way mergekit's pydantic types do (ints widen to float)."""
        if value is None and self.default is None:
            return None
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError(f"{self.name} must be true or false, got {value!r}")
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError(f"{self.name} must be an integer, got {value!r}")
            number = float(value)
            if not number.is_integer():
                raise ValueError(f"{self.name} must be an integer, got {value!r}")
            return int(number)
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{self.name} must be a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{self.name} must be a number, got {value!r}") from None


@dataclass(frozen=True)
class Inputs:
    """The tensors of one output weight, in recipe order, all of one shape, dtype and device.

    `deltas` may carry precomputed task vectors (input - base) for the non-base inputs,
    which the engine caches across recipes; methods read them through `task_vectors()`.
    `out`, when given, is where the caller wants the result (methods may write it there and
    return it); `workspace` lends reusable scratch buffers. Inputs are never modified.
    """

    tensors: tuple[torch.Tensor, ...]
    base_index: int | None = None
    deltas: tuple[torch.Tensor, ...] | None = None
    out: torch.Tensor | None = None
    workspace: Workspace = field(default_factory=lambda: Workspace(persistent=False))

    def output(self, like: torch.Tensor) -> torch.Tensor:
        """`out` when it can hold a result computed like `like`, else a new tensor."""
        if self.out is not None and self.out.dtype == like.dtype and self.out.shape == like.shape:
            return self.out
        return torch.empty_like(like)

    @property
    def base(self) -> torch.Tensor | None:
        return None if self.base_index is None else self.tensors[self.base_index]

    @property
    def others(self) -> tuple[torch.Tensor, ...]:
        return tuple(x for i, x in enumerate(self.tensors) if i != self.base_index)

    def task_vectors(self) -> tuple[torch.Tensor, ...]:
        if self.deltas is not None:
            return self.deltas
        base = self.base
        assert base is not None, "task vectors need a base"
        return tuple(x - base for x in self.others)


MergeFn = Callable[..., torch.Tensor]
CoefficientsFn = Callable[..., "list[float] | None"]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MergeFn
    params: tuple[Param, ...] = ()
    base: BasePolicy = BasePolicy.IGNORED
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    random: bool = False  # takes a `generator` keyword and is reproducible with it
    # When the merge is a fixed linear combination of the inputs for the given
    # parameters, returns its coefficients (one per input, recipe order): the engine then
    # runs one fused pass instead of the general function. Same result, less traffic.
    coefficients: CoefficientsFn | None = None
    reference: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def check_inputs(self, n_inputs: int, has_base: bool, where: str) -> str | None:
        """Returns why this many inputs cannot be merged, or None."""
        uses_base = has_base and self.base is not BasePolicy.IGNORED
        if self.base is BasePolicy.REQUIRED and not uses_base:
            return f"{where}: merge_method '{self.name}' needs a base_model among its inputs"
        if n_inputs < self.min_inputs:
            return f"{where}: merge_method '{self.name}' needs at least {self.min_inputs} inputs, got {n_inputs}"
        if self.max_inputs is not None and n_inputs > self.max_inputs:
            return f"{where}: merge_method '{self.name}' takes at most {self.max_inputs} inputs, got {n_inputs}"
        non_base = n_inputs - int(uses_base)
        if self.min_non_base is not None and non_base < self.min_non_base:
            return f"{where}: merge_method '{self.name}' needs at least {self.min_non_base} non-base models, got {non_base}"
        if self.max_non_base is not None and non_base > self.max_non_base:
            return f"{where}: merge_method '{self.name}' takes at most {self.max_non_base} non-base models, got {non_base}"
        return None

    def __call__(self, inputs: Inputs, generator: torch.Generator | None = None, **params: Any) -> torch.Tensor:
        if self.random:
            params["generator"] = generator
        return self.fn(inputs, **self.options, **params)


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} registered twice")
    _REGISTRY[method.name] = method
    return method


def get(name: str) -> MergeMethod:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(name) from None


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def _load_all() -> None:
    # One module per family; importing registers them.
    from evomerge.methods import (  # noqa: F401
        arcee_fusion,
        linear,
        model_stock,
        nearswap,
        passthrough,
        ram,
        sce,
        spherical,
        task_arithmetic,
    )


def in_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value is None:
            return None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            lo = "(" if low_open else "["
            hi = ")" if high_open else "]"
            return f"must be in {lo}{low:g}, {high:g}{hi}, got {value:g}"
        return None

    return check


def stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tuple(tensors), dim=0)
