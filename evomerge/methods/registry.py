"""The method registry: a merge method is a pure tensor function plus a small spec.

A method receives the tensors of one output weight (an `Inputs` bundle) and its
resolved parameters, and returns the merged tensor. It does no I/O and knows nothing
about recipes, models or the search; the engine resolves parameters and places tensors.
Semantics and defaults follow mergekit 0.1.5 so a recipe means the same in both tools.

Everything known about a parameter is declared once, on the function's signature (as mergekit's
`easy_define` does): its type and default, and in `Annotated` metadata its scope (`Scope`), its
bounds (`InRange`) and how the search explores it (`Search`). `define` derives the `Param`s from
that signature and registers the method; the search only ever asks the registry.

    @define(base=BasePolicy.REQUIRED)
    def nearswap(inputs: Inputs, *, t: Annotated[float, Search(1e-4, 1e-1, log=True)]) -> torch.Tensor:
"""

from __future__ import annotations

import enum
import inspect
import typing
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Callable, Mapping, Sequence

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
class InRange:
    """A parameter's valid values; called with a value, returns why it is out of range, or None."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __call__(self, value: Any) -> str | None:
        if value is None:
            return None
        too_low = value <= self.low if self.low_open else value < self.low
        too_high = value >= self.high if self.high_open else value > self.high
        if too_low or too_high:
            return f"must be in {self}, got {value:g}"
        return None

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def in_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> InRange:
    return InRange(low, high, low_open, high_open)


@dataclass(frozen=True)
class Search:
    """How the search explores a parameter: its default range (`log` for a log scale) and whether it
    gets a schedule of control points over the layers (`per_layer`) or one global value."""

    low: float
    high: float
    log: bool = False
    per_layer: bool = False


@dataclass(frozen=True)
class Param:
    name: str
    type: type  # float, int or bool; `None` allowed when default is None
    scope: Scope = Scope.SHARED
    default: Any = REQUIRED
    # Returns an error message for an out-of-range value, or None when fine.
    check: Callable[[Any], str | None] | None = None
    search: Search | None = None  # None: never searched, the recipe's value or the default is used
    arg: str = ""  # the function's argument name when it differs (`lambda` is passed as `lambda_`)

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
# One model's searched settings -> settings inside the method's valid region (see MergeMethod.constrain).
ConstrainFn = Callable[[dict[str, Any]], dict[str, Any]]


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
    # Cross-parameter constraints for the search: maps the settings proposed for one model
    # ({param: scalar, gradient or filter list}) into the method's valid region.
    constrain: ConstrainFn | None = None
    reference: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    # mergekit 0.1.5's own arithmetic for this method (evomerge.methods.exact), called with the same
    # arguments when a merge must reproduce mergekit bit for bit; None: `fn` already is.
    exact: MergeFn | None = None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def searched(self) -> tuple[Param, ...]:
        """The parameters a search explores, in declaration order."""
        return tuple(p for p in self.params if p.search is not None)

    @property
    def copies_one_input(self) -> bool:
        """A method that takes one input (passthrough): searched by stacking layer slices."""
        return self.max_inputs == 1

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

    def __call__(self, inputs: Inputs, generator: torch.Generator | None = None, *, exact: bool = False,
                 **params: Any) -> torch.Tensor:
        """Merges one tensor; `exact`: with mergekit's arithmetic (inputs in the recipe's dtype)."""
        arguments = {p.arg or p.name: params.pop(p.name) for p in self.params if p.arg and p.name in params}
        if self.random:
            arguments["generator"] = generator
        fn = self.exact if exact and self.exact is not None else self.fn
        return fn(inputs, **self.options, **params, **arguments)


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} registered twice")
    _REGISTRY[method.name] = method
    return method


def get(name: str) -> MergeMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(name) from None


def attach_exact(name: str) -> Callable[[MergeFn], MergeFn]:
    """Registers `fn` as method `name`'s mergekit-exact arithmetic (see evomerge.methods.exact)."""

    def decorate(fn: MergeFn) -> MergeFn:
        _REGISTRY[name] = replace(get(name), exact=fn)
        return fn

    return decorate


def names() -> list[str]:
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------- definition


def params_of(fn: MergeFn, *, skip: Sequence[str] = ()) -> tuple[Param, ...]:
    """The `Param`s a function declares: its keyword-only arguments, with their defaults and the
    `Scope`, `InRange` and `Search` found in their `Annotated` metadata. A per-model parameter is
    annotated as a sequence of its element type; a trailing underscore is dropped from the name
    (`lambda_` is the recipe's `lambda`)."""
    hints = typing.get_type_hints(fn, include_extras=True)
    params = []
    for arg in inspect.signature(fn).parameters.values():
        if arg.kind is not arg.KEYWORD_ONLY or arg.name in ("generator", *skip):
            continue
        hint, metadata = hints[arg.name], ()
        if typing.get_origin(hint) is Annotated:
            hint, *metadata = typing.get_args(hint)
        scope = next((m for m in metadata if isinstance(m, Scope)), Scope.SHARED)
        kind = _scalar_type(hint, scope, f"{fn.__name__}({arg.name})")
        name = arg.name.rstrip("_")
        params.append(Param(
            name, kind, scope,
            default=REQUIRED if arg.default is arg.empty else arg.default,
            check=next((m for m in metadata if isinstance(m, InRange)), None),
            search=next((m for m in metadata if isinstance(m, Search)), None),
            arg=arg.name if name != arg.name else "",
        ))
    return tuple(params)


def _scalar_type(hint: Any, scope: Scope, where: str) -> type:
    if scope is not Scope.SHARED:  # Sequence[float] -> float
        (hint,) = typing.get_args(hint) or (None,)
    options = [t for t in (typing.get_args(hint) or (hint,)) if t is not type(None)]  # float | None -> float
    if len(options) != 1 or options[0] not in (bool, int, float):
        raise TypeError(f"{where}: a merge parameter is a bool, int or float (or a sequence of one), got {hint!r}")
    return options[0]


def define(
    fn: MergeFn | None = None,
    *,
    name: str | None = None,
    defaults: Mapping[str, Any] | None = None,
    skip: Sequence[str] = (),
    unsearched: Sequence[str] = (),
    **spec: Any,
):
    """Registers `fn` as merge method `name` (default: the function's name) with the parameters its
    signature declares. A family of methods sharing one function gives each member its own
    `defaults`, leaves out arguments with `skip` (and the `options` it binds), and `unsearched`
    names parameters the member accepts but a search should not explore.
    Usable as `@define(...)` or `define(fn, ...)`."""

    def decorate(function: MergeFn) -> MergeFn:
        skipped = (*skip, *spec.get("options", {}))
        params = tuple(
            replace(p, default=(defaults or {}).get(p.name, p.default),
                    search=None if p.name in unsearched else p.search)
            for p in params_of(function, skip=skipped)
        )
        random = "generator" in inspect.signature(function).parameters
        register(MergeMethod(name=name or function.__name__, fn=function, params=params,
                             random=spec.pop("random", random), **spec))
        return function

    return decorate(fn) if fn is not None else decorate


# Per-model parameters, as annotations: one value per input (the base included) or per non-base input.
PerInput = Annotated[Sequence[float], Scope.INPUT]
PerModel = Annotated[Sequence[float], Scope.NON_BASE]
