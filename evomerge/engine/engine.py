"""The merge engine: sources resident on one device, recipes materialised in place.

Loading happens once: every source tensor goes into a stack `[n_models, *shape]` on the chosen
device and dtype. Each recipe is then planned (no tensors) and executed tensor by tensor
straight into the parameters of one preallocated transformers model, so a candidate costs one
pass over the sources and no disk I/O. Memory: the sources, the task-vector cache when it fits,
one model, and scratch for the largest tensor.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from evomerge.checkpoint import SourceModel, locate
from evomerge.device import available_bytes, dtype_name, parse_dtype, resolve_device
from evomerge.engine.plan import Job, Layout, Plan, plan_recipe
from evomerge.engine.vocab import Vocabulary, build_vocabulary
from evomerge.errors import ArchitectureMismatch, MergeFailure, RecipeError
from evomerge.methods.kernels import Workspace, accumulation_dtype, weighted_sum
from evomerge.methods.registry import Inputs
from evomerge.recipe import Recipe, TokenizerSetting

log = logging.getLogger(__name__)

# Config keys that must agree for two checkpoints to be merged tensor by tensor (vocab_size too,
# unless a tokenizer setting maps every source onto one output vocabulary).
_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")


@dataclass
class MergeStats:
    tensors: int = 0
    fused: int = 0  # tensors merged by the fused weighted-sum path
    bytes_read: int = 0
    bytes_written: int = 0


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed: random methods give the same result whatever order tensors run in."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class MergeEngine:
    """Holds source models resident and writes recipes into one model.

    models:   recipe references (local dirs, .gguf files, Hugging Face ids in the cache)
    base_model: reference whose config shapes the output (default: the first model)
    dtype:    dtype the sources are held in (default: the base checkpoint's)
    out_dtype: dtype of the output model (default: dtype)
    delta_cache: cache task vectors (source - base) across recipes: True, False or "auto"
                 (when they fit in the free memory of the device, with a 25% margin)
    tokenizer: the recipes' tokenizer setting (mergekit's `tokenizer:` block): every source's
               embedding and LM-head rows are mapped onto its output vocabulary
    mergekit_exact: merge with mergekit 0.1.5's arithmetic (evomerge.methods.exact): in `dtype`,
               operation for operation, so a published recipe gives mergekit's tensors bit for bit;
               no fused weighted sums and no task-vector cache
    """

    def __init__(
        self,
        models: Iterable[str],
        *,
        base_model: str | None = None,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = None,
        out_dtype: str | torch.dtype | None = None,
        allow_bin: bool = False,
        delta_cache: bool | str = "auto",
        tokenizer: TokenizerSetting | None = None,
        mergekit_exact: bool = False,
        progress: bool = True,
    ):
        refs = list(dict.fromkeys(models))
        if base_model is not None and base_model not in refs:
            refs.insert(0, base_model)
        if not refs:
            raise RecipeError("no source models given")
        self.device = resolve_device(device)
        self.progress = progress
        self.sources: dict[str, SourceModel] = {ref: locate(ref, allow_bin=allow_bin) for ref in refs}
        self.refs = refs
        self.reference = base_model or refs[0]
        reference = self.sources[self.reference]
        self.dtype = parse_dtype(dtype) or reference.stored_dtype()
        self.out_dtype = parse_dtype(out_dtype, field="out_dtype") or self.dtype
        # Merge arithmetic runs in float32 (float64 stays float64): half precision loses the small deltas;
        # mergekit-exact merges compute as mergekit does, in the sources' dtype.
        self.mergekit_exact = mergekit_exact
        self.compute_dtype = self.dtype if mergekit_exact else accumulation_dtype(self.dtype)
        self.delta_cache_mode = False if mergekit_exact else delta_cache
        self.tokenizer_setting = tokenizer
        self.vocabulary: Vocabulary | None = (
            build_vocabulary(tokenizer, self.sources, self.reference) if tokenizer is not None else None)

        self.model_layers = {ref: src.num_layers for ref, src in self.sources.items()}
        self._check_architectures()
        skeleton = self._build_model(self.model_layers[self.reference])
        self.layout = Layout.of(skeleton, self.model_layers[self.reference])
        self._check_tensors(skeleton)
        self._model: nn.Module | None = skeleton
        self._load()
        self._deltas: dict[str, torch.Tensor] = {}
        self._delta_base: str | tuple | None = None
        self.workspace = Workspace()  # scratch reused by every candidate: no page faults per merge
        self.last_stats = MergeStats()

    # ------------------------------------------------------------------ setup

    def _check_architectures(self) -> None:
        ref_cfg = self.sources[self.reference].config
        for ref, source in self.sources.items():
            cfg = source.config
            if cfg.model_type != ref_cfg.model_type:
                raise ArchitectureMismatch(
                    f"model '{ref}' is a {cfg.model_type} model, but '{self.reference}' is {ref_cfg.model_type}"
                )
            for key in _SHAPE_KEYS:
                a, b = getattr(cfg, key, None), getattr(ref_cfg, key, None)
                if a != b:
                    raise ArchitectureMismatch(
                        f"model '{ref}' has {key}={a}, but '{self.reference}' has {key}={b}"
                    )
            if self.vocabulary is None and cfg.vocab_size != ref_cfg.vocab_size:
                raise ArchitectureMismatch(
                    f"model '{ref}' has vocab_size={cfg.vocab_size}, but '{self.reference}' has "
                    f"vocab_size={ref_cfg.vocab_size}: their vocabularies differ; add `tokenizer_source: union` "
                    "(or base, or a model) to the recipe (`tokenizer:` in space.yaml) to map their embedding rows "
                    "onto one output vocabulary"
                )

    def _model_names(self, ref: str) -> list[str]:
        return self.layout.names(self.model_layers[ref])

    def _check_tensors(self, skeleton: nn.Module) -> None:
        """Every source must have every tensor with the output model's shape, checked from the
        safetensors headers before anything is loaded."""
        params = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}
        per_layer = {s: params[self.layout.layer_name(0, s)] for s in self.layout.layer_suffixes}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for ref in self.refs:
            for layer in range(self.model_layers[ref]):
                for suffix, shape in per_layer.items():
                    self.shapes[self.layout.layer_name(layer, suffix)] = shape
        for name in (*self.layout.pre, *self.layout.post):
            self.shapes[name] = params[name]
        for ref in self.refs:
            shapes = self.sources[ref].tensor_shapes()
            if shapes is None:
                continue  # GGUF / .bin: checked when loaded
            for name in self._model_names(ref):
                if name not in shapes:
                    raise ArchitectureMismatch(f"model '{ref}' has no tensor '{name}'")
                if shapes[name] != self._source_shape(ref, name):
                    raise ArchitectureMismatch(
                        f"model '{ref}': tensor '{name}' has shape {list(shapes[name])}, "
                        f"expected {list(self._source_shape(ref, name))}"
                    )

    def _mapped(self, name: str) -> bool:
        """A vocabulary tensor whose rows are mapped onto the output vocabulary."""
        return self.vocabulary is not None and name in self.layout.vocab

    def _source_shape(self, ref: str, name: str) -> tuple[int, ...]:
        """The shape tensor `name` has in source `ref`: the output's, but for the rows of a mapped
        vocabulary tensor, which are the source's own tokens."""
        if self._mapped(name):
            return (self.sources[ref].vocab_size, *self.shapes[name][1:])
        return self.shapes[name]

    def _load(self) -> None:
        """Reads every source once into per-tensor stacks on the device."""
        self.rows: dict[str, dict[str, int]] = {}  # tensor name -> {model ref: row}
        self.vocab_tensors: dict[str, dict[str, torch.Tensor]] = {}  # mapped name -> {model ref: its own rows}
        self._vocab_maps: dict[tuple, list[torch.Tensor]] = {}  # (name, models, base) -> mapped, per model
        for ref in self.refs:
            for name in self._model_names(ref):
                if self._mapped(name):
                    continue
                rows = self.rows.setdefault(name, {})
                rows[ref] = len(rows)
        self.stacks: dict[str, torch.Tensor] = {
            name: torch.empty((len(rows), *self.shapes[name]), dtype=self.dtype, device=self.device)
            for name, rows in self.rows.items()
        }
        total = sum(len(self._model_names(r)) for r in self.refs)
        with tqdm(total=total, desc="loading sources", unit="tensor", disable=not self.progress) as bar:
            for ref in self.refs:
                wanted = set(self._model_names(ref))
                loaded = set()
                for name, tensor in self.sources[ref].iter_tensors(wanted, self.dtype, self.device):
                    expected = self._source_shape(ref, name)
                    if tuple(tensor.shape) != tuple(expected):
                        raise ArchitectureMismatch(
                            f"model '{ref}': tensor '{name}' has shape {list(tensor.shape)}, expected {list(expected)}"
                        )
                    if self._mapped(name):
                        self.vocab_tensors.setdefault(name, {})[ref] = tensor.contiguous()
                    else:
                        self.stacks[name][self.rows[name][ref]].copy_(tensor)
                    loaded.add(name)
                    bar.update(1)
                missing = wanted - loaded
                if missing:
                    raise ArchitectureMismatch(f"model '{ref}' has no tensor '{sorted(missing)[0]}' ({len(missing)} missing)")
        log.info(
            "loaded %d source models (%s, %s) on %s: %.2f GB resident",
            len(self.refs), dtype_name(self.dtype), self.sources[self.reference].config.model_type,
            self.device, self.source_bytes / 1e9,
        )

    @property
    def source_bytes(self) -> int:
        tensors = [*self.stacks.values(), *(t for by_ref in self.vocab_tensors.values() for t in by_ref.values())]
        return sum(t.numel() * t.element_size() for t in tensors)

    def source_tensor(self, ref: str, name: str) -> torch.Tensor:
        """Source `ref`'s tensor `name` (a mapped vocabulary tensor: its own rows, not yet mapped)."""
        if self._mapped(name):
            return self.vocab_tensors[name][ref]
        return self.stacks[name][self.rows[name][ref]]

    def _inputs(self, job: Job) -> list[torch.Tensor]:
        """The input tensors of a job; a vocabulary tensor's mapped onto the output vocabulary once
        per (tensor, models, base) and kept, since the rows a model lacks depend on its company."""
        if not self._mapped(job.name):
            return [self.source_tensor(model, name) for model, name in job.sources]
        key = (job.name, job.sources, job.base_model)
        if key not in self._vocab_maps:
            if len(self._vocab_maps) >= 8:  # recipes over other subsets of the models: keep the latest
                self._vocab_maps.pop(next(iter(self._vocab_maps)))
            tensors = {model: self.vocab_tensors[name][model] for model, name in job.sources}
            self._vocab_maps[key] = self.vocabulary.map(job.name, tensors, base=job.base_model)
        return self._vocab_maps[key]

    # ------------------------------------------------------------------ output model

    def _config(self, num_layers: int):
        """The reference's config for an output of `num_layers` layers (and the output vocabulary)."""
        config = copy.deepcopy(self.sources[self.reference].config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # GGUF sources: the merged model is plain weights
        config.num_hidden_layers = num_layers
        if self.vocabulary is not None:
            config.vocab_size = self.vocabulary.size
        return config

    def output_config(self, plan: Plan):
        config = self._config(plan.num_layers)
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list):
            config.layer_types = [
                self.sources[model].config.layer_types[layer] for model, layer in plan.layer_origin
            ]
        config.dtype = self.out_dtype
        return config

    def _build_model(self, num_layers: int, config=None) -> nn.Module:
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        if config is None:
            config = self._config(num_layers)
        with no_init_weights(), torch.device(self.device):
            model = AutoModelForCausalLM.from_config(config, dtype=self.out_dtype)
        model.tie_weights()  # skipped under no_init_weights; tied weights must be one parameter
        model.requires_grad_(False)
        return model.eval()

    def model_for(self, plan: Plan) -> nn.Module:
        """The resident output model, rebuilt only when a recipe changes the layer count."""
        if self._model is None or self._model.config.num_hidden_layers != plan.num_layers:
            self._model = None  # free the old one first
            self._model = self._build_model(plan.num_layers, self.output_config(plan))
        return self._model

    # ------------------------------------------------------------------ merging

    def plan(self, recipe: Recipe) -> Plan:
        if recipe.dtype and parse_dtype(recipe.dtype) != self.dtype:
            raise RecipeError(
                f"dtype: recipe asks for {recipe.dtype} but the sources are resident in {dtype_name(self.dtype)}; "
                "load the engine with that dtype"
            )
        if recipe.out_dtype and parse_dtype(recipe.out_dtype) != self.out_dtype:
            raise RecipeError(
                f"out_dtype: recipe asks for {recipe.out_dtype} but the output model is {dtype_name(self.out_dtype)}"
            )
        if recipe.vocabulary() != self.tokenizer_setting:
            raise RecipeError(
                f"tokenizer: the recipe asks for {_vocabulary_text(recipe.vocabulary())}, but the sources were "
                f"loaded for {_vocabulary_text(self.tokenizer_setting)}; load the engine with the recipe's setting"
            )
        return plan_recipe(recipe, self.layout, self.model_layers)

    def materialize(self, recipe: Recipe, seed: int = 0, *, check_finite: bool = True, progress: bool = False) -> nn.Module:
        """Writes the recipe's weights into the resident model and returns it.

        Raises RecipeError for structural problems (before any arithmetic) and MergeFailure
        when the merge itself fails or gives NaN/inf weights.
        """
        plan = self.plan(recipe)
        model = self.model_for(plan)
        params = {name: p.data for name, p in model.named_parameters()}
        stats = MergeStats()
        for job in tqdm(plan.jobs, desc=f"merging ({plan.method.name})", unit="tensor", disable=not progress):
            target = params[job.name]
            try:
                self._run(plan, job, target, seed, stats)
            except Exception as exc:
                if not _candidate_error(exc):
                    raise  # a bug: it stops the search with its traceback instead of failing one candidate
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                reason = "out of memory" if _is_oom(exc) else " ".join(str(exc).split())
                raise MergeFailure(f"{plan.method.name} failed on tensor {job.name}: {reason}") from exc
            if check_finite and not _all_finite(target):
                raise MergeFailure(f"{plan.method.name} produced NaN/inf in tensor {job.name}")
        self.last_stats = stats
        return model

    def _run(self, plan: Plan, job: Job, out: torch.Tensor, seed: int, stats: MergeStats) -> None:
        method = plan.method
        tensors = self._inputs(job)
        stats.tensors += 1
        stats.bytes_written += out.numel() * out.element_size()
        coefficients = None
        if method.coefficients and not self.mergekit_exact:
            coefficients = method.coefficients(len(tensors), job.base_index, **job.params)
        if coefficients is not None:
            stats.fused += 1
            stats.bytes_read += sum(t.numel() * t.element_size() for t, c in zip(tensors, coefficients) if c != 0)
            weighted_sum(tensors, coefficients, out=out)
            return
        stats.bytes_read += sum(t.numel() * t.element_size() for t in tensors)
        work = tuple(t.to(self.compute_dtype) for t in tensors)
        deltas = None
        if job.base_index is not None and not self._mapped(job.name) and self._deltas_ready(job.sources[job.base_index][0]):
            deltas = tuple(
                self._delta(model, name).to(self.compute_dtype)
                for i, (model, name) in enumerate(job.sources)
                if i != job.base_index
            )
        generator = None
        if method.random:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(tensor_seed(seed, job.name))
        inputs = Inputs(work, job.base_index, deltas, out=out, workspace=self.workspace)
        result = method(inputs, generator=generator, exact=self.mergekit_exact, **job.params)
        if result.shape != out.shape:
            raise MergeFailure(
                f"{method.name} returned shape {list(result.shape)} for tensor {job.name}, expected {list(out.shape)}"
            )
        if result is not out:
            out.copy_(result)

    # ------------------------------------------------------------------ task-vector cache

    def _delta(self, model: str, name: str) -> torch.Tensor:
        return self._deltas[name][self._delta_rows[name][model]]

    def _deltas_ready(self, base: str) -> bool:
        """Task vectors against `base`, computed on first need (one pass) and kept while the
        recipes use that base, when caching is on and they fit."""
        if self.delta_cache_mode is False:
            return False
        if base == self._delta_base:
            return True
        if self._delta_base == ("skipped", base):
            return False
        self._deltas, self._delta_base = {}, None
        size = sum(
            self.stacks[name][0].numel() * self.stacks[name].element_size() * (len(rows) - 1)
            for name, rows in self.rows.items()
            if base in rows
        )
        if self.delta_cache_mode == "auto":
            free = available_bytes(self.device)
            if size * 1.25 > free:
                log.info("task-vector cache skipped: needs %.2f GB, %.2f GB free", size / 1e9, free / 1e9)
                self._delta_base = ("skipped", base)
                return False
        self._delta_rows: dict[str, dict[str, int]] = {}
        for name, rows in self.rows.items():
            if base not in rows:
                continue
            members = [r for r in rows if r != base]
            stack = self.stacks[name]
            base_row = stack[rows[base]]
            deltas = torch.empty((len(members), *base_row.shape), dtype=self.dtype, device=self.device)
            for i, ref in enumerate(members):
                torch.sub(stack[rows[ref]], base_row, out=deltas[i])
            self._deltas[name] = deltas
            self._delta_rows[name] = {ref: i for i, ref in enumerate(members)}
        self._delta_base = base
        log.info("cached task vectors against '%s' (%.2f GB)", base, size / 1e9)
        return True

    def release(self) -> None:
        """Frees the resident tensors (the engine is unusable afterwards)."""
        self.stacks.clear()
        self.vocab_tensors.clear()
        self._vocab_maps.clear()
        self._deltas.clear()
        self.workspace.clear()
        self._model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _vocabulary_text(setting: TokenizerSetting | None) -> str:
    return "every source's own vocabulary (no tokenizer setting)" if setting is None else (
        f"tokenizer {setting.model_dump(exclude_none=True)}")


def _candidate_error(exc: BaseException) -> bool:
    """What a valid recipe can still raise for some parameter values: a method's ValueError (DELLA's
    density ± epsilon, multislerp's cancelling weights), arithmetic and linear-algebra failures, and
    running out of memory. Anything else is a bug."""
    return isinstance(exc, (ValueError, ArithmeticError, MemoryError, torch.linalg.LinAlgError)) or _is_oom(exc)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(exc) or (
        "out of memory" in str(exc).lower()
    )


def _all_finite(tensor: torch.Tensor) -> bool:
    """A sum is finite exactly when every entry is (overflow aside, which only sends us to the exact
    check); it streams at memory speed, where torch.isfinite runs ~25x slower on CPUs."""
    if torch.isfinite(tensor.sum(dtype=torch.float32)):
        return True
    return bool(torch.isfinite(tensor).all())
