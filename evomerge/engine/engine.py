"""The merge engine: sources placed once, recipes materialised in place.

Before anything loads, the memory planner (evomerge.engine.memory) counts what the engine will
hold and places each source on a tier: resident on the device (its tensors in per-tensor stacks
`[n_models, *shape]`), in host memory, or memory-mapped from its safetensors files
(evomerge.engine.store). Each recipe is then planned (no tensors) and executed tensor by tensor
straight into the parameters of one preallocated transformers model, so a candidate costs one
pass over the sources and no disk writes. Merges are bit-identical on every tier.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from evomerge.checkpoint import SourceModel, empty_model, locate, plain_config
from evomerge.device import dtype_name, parse_dtype, resolve_device
from evomerge.engine import memory
from evomerge.engine.plan import Job, Layout, Plan, plan_recipe, tensor_seed
from evomerge.engine.store import ALIGN, SourceStore
from evomerge.engine.vocab import Vocabulary, build_vocabulary
from evomerge.errors import ArchitectureMismatch, MergeFailure, RecipeError
from evomerge.methods.kernels import Workspace, accumulation_dtype, weighted_sum
from evomerge.methods.registry import Inputs
from evomerge.moe import MoEConfig
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


class MergeEngine:
    """Holds source models resident and writes recipes into one model.

    models:   recipe references (local dirs, .gguf files, Hugging Face ids in the cache)
    base_model: reference whose config shapes the output (default: the first model)
    dtype:    dtype the sources are held in (default: the base checkpoint's)
    out_dtype: dtype of the output model (default: dtype)
    delta_cache: cache task vectors (source - base, in the compute dtype) across recipes: True,
                 False or "auto" (when the memory plan has room for them on the device)
    tokenizer: the recipes' tokenizer setting (mergekit's `tokenizer:` block): every source's
               embedding and LM-head rows are mapped onto its output vocabulary
    mergekit_exact: merge with mergekit 0.1.5's arithmetic (evomerge.methods.exact): in `dtype`,
               operation for operation, so a published recipe gives mergekit's tensors bit for bit;
               no fused weighted sums and no task-vector cache
    placement: where the sources live: "auto" (the fastest tier that fits), "device", "host" or "disk"
    device_memory / host_memory: bytes (or "80GB") the plan may use, default the free memory measured now
    evaluation: (batch, tokens) the evaluator will run on the resident model, counted in the plan
    output_layers: the most layers a recipe will give the output (layer stacking), counted in the plan
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
        placement: str = "auto",
        device_memory: int | str | None = None,
        host_memory: int | str | None = None,
        evaluation: tuple[int, int] | None = None,
        output_layers: int | None = None,
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
        self.dtype, self.out_dtype, self.compute_dtype = resolve_dtypes(
            self.sources[self.reference], dtype, out_dtype, mergekit_exact)
        self.mergekit_exact = mergekit_exact
        self.compute_size = torch.empty((), dtype=self.compute_dtype).element_size()
        self.tokenizer_setting = tokenizer
        self.vocabulary: Vocabulary | None = (
            build_vocabulary(tokenizer, self.sources, self.reference) if tokenizer is not None else None)

        self.model_layers = {ref: src.num_layers for ref, src in self.sources.items()}
        self._check_architectures()
        self.memory_plan = self._plan_memory(
            base=base_model, delta_cache=delta_cache, placement=placement, device_memory=device_memory,
            host_memory=host_memory, evaluation=evaluation, output_layers=output_layers)
        skeleton = self._build_model(self.model_layers[self.reference])
        self.layout = Layout.of(skeleton, self.model_layers[self.reference])
        self._check_tensors(skeleton)
        self._model: nn.Module | None = skeleton
        self.store = SourceStore(self.device, self.dtype, self.memory_plan.tiers)
        self._load()
        self._deltas: dict[str, torch.Tensor] = {}
        self._delta_base: str | tuple | None = None
        self.workspace = Workspace()  # scratch reused by every candidate: no page faults per merge
        self.last_stats = MergeStats()
        self._moe = None

    # ------------------------------------------------------------------ setup

    def _plan_memory(self, *, base, delta_cache, **options) -> memory.MemoryPlan:
        """The memory plan, from the configs and free memory measured before anything is allocated."""
        plan = plan_sources(self.sources, reference=self.reference, device=self.device, present=True,
                            dtypes=(self.dtype, self.out_dtype, self.compute_dtype), mergekit_exact=self.mergekit_exact,
                            base=base, delta_cache=delta_cache, mapped_vocab=self.vocabulary is not None, **options)
        tiers = {tier: sum(t == tier for t in plan.tiers.values()) for tier in memory.TIERS}
        log.info("memory plan on %s: %.2f GB of %.2f GB usable; sources on %s; task-vector cache %s",
                 self.device, plan.device_total / 1e9, plan.device_budget / 1e9,
                 ", ".join(f"{tier} {n}" for tier, n in tiers.items() if n), "on" if plan.cache else "off")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", plan.render())
        return plan

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
        """Reads every device- and host-tier source once (device tier: into per-tensor stacks) and maps
        the disk-tier ones; mapped vocabulary rows are loaded onto the device whatever the tier."""
        self.vocab_tensors: dict[str, dict[str, torch.Tensor]] = {}  # mapped name -> {model ref: its own rows}
        self._vocab_maps: dict[tuple, list[torch.Tensor]] = {}  # (name, models, base) -> mapped, per model
        tiers = self.memory_plan.tiers
        holders: dict[str, list[str]] = {}
        for ref in self.refs:
            for name in self._model_names(ref):
                if not self._mapped(name) and tiers[ref] == "device":
                    holders.setdefault(name, []).append(ref)
        self.store.allocate_stacks(holders, self.shapes)
        for ref in self.refs:
            if tiers[ref] == "disk":
                self.store.map(ref, self.sources[ref].files)
        # what is read now: everything of device- and host-tier sources, the mapped vocabulary rows of disk-tier ones
        reads = {ref: {name for name in self._model_names(ref) if tiers[ref] != "disk" or self._mapped(name)}
                 for ref in self.refs}
        with tqdm(total=sum(map(len, reads.values())), desc="loading sources", unit="tensor",
                  disable=not self.progress) as bar:
            for ref, wanted in reads.items():
                if not wanted:
                    continue
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
                        self.store.put(ref, name, tensor)
                    loaded.add(name)
                    bar.update(1)
                missing = wanted - loaded
                if missing:
                    raise ArchitectureMismatch(f"model '{ref}' has no tensor '{sorted(missing)[0]}' ({len(missing)} missing)")
        log.info(
            "loaded %d source models (%s, %s) on %s: %.2f GB on the device, %.2f GB on the host, %d memory-mapped",
            len(self.refs), dtype_name(self.dtype), self.sources[self.reference].config.model_type,
            self.device, self.source_bytes / 1e9, self.store.resident_bytes["host"] / 1e9,
            sum(t == "disk" for t in tiers.values()),
        )

    @property
    def source_bytes(self) -> int:
        """Bytes of source tensors held on the device (stacks and mapped vocabulary rows)."""
        vocab = sum(t.numel() * t.element_size() for by_ref in self.vocab_tensors.values() for t in by_ref.values())
        return self.store.resident_bytes["device"] + vocab

    def source_tensor(self, ref: str, name: str) -> torch.Tensor:
        """Source `ref`'s tensor `name` where it lies (a mapped vocabulary tensor: its own rows, not yet mapped)."""
        if self._mapped(name):
            return self.vocab_tensors[name][ref]
        return self.store.get(ref, name)

    def _inputs(self, job: Job, upcoming: Job | None = None) -> list[torch.Tensor]:
        """The input tensors of a job on the device (the next job's read from the host and disk tiers
        meanwhile); a vocabulary tensor's mapped onto the output vocabulary once per (tensor, models,
        base) and kept, since the rows a model lacks depend on its company."""
        if not self._mapped(job.name):
            ahead = upcoming.sources if upcoming is not None and not self._mapped(upcoming.name) else None
            return self.store.fetch(job.sources, ahead=ahead)
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
        config = plain_config(self.sources[self.reference].config)  # GGUF sources: the merge is plain weights
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
        return empty_model(config if config is not None else self._config(num_layers), self.out_dtype, self.device)

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

    def materialize(self, recipe: Recipe | MoEConfig, seed: int = 0, *, check_finite: bool = True,
                    progress: bool = False) -> nn.Module:
        """Writes the recipe's weights into the resident model and returns it (a MoE config: into the
        resident MoE model, see evomerge.engine.moe).

        Raises RecipeError for structural problems (before any arithmetic) and MergeFailure
        when the merge itself fails or gives NaN/inf weights.
        """
        if isinstance(recipe, MoEConfig):
            return self.moe.materialize(recipe, seed=seed, progress=progress)
        plan = self.plan(recipe)
        model = self.model_for(plan)
        params = {name: p.data for name, p in model.named_parameters()}
        stats = MergeStats()
        jobs = plan.jobs
        for i, job in enumerate(tqdm(jobs, desc=f"merging ({plan.method.name})", unit="tensor", disable=not progress)):
            target = params[job.name]
            try:
                self._run(plan, job, target, seed, stats, upcoming=jobs[i + 1] if i + 1 < len(jobs) else None)
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

    def _run(self, plan: Plan, job: Job, out: torch.Tensor, seed: int, stats: MergeStats,
             upcoming: Job | None = None) -> None:
        method = plan.method
        tensors = self._inputs(job, upcoming)
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
        shape = self.shapes[name]
        return self._deltas[name][self._delta_rows[name][model], : math.prod(shape)].view(shape)

    def _deltas_ready(self, base: str) -> bool:
        """Task vectors against `base`, computed on first need (one pass) and kept while the
        recipes use that base, when caching is on and they fit."""
        if not self.memory_plan.cache:
            return False
        if base == self._delta_base:
            return True
        if self._delta_base == ("skipped", base):
            return False
        self._deltas, self._delta_base = {}, None
        size = sum(
            math.prod(self.shapes[name]) * self.compute_size * (len(rows) - 1)
            for name, rows in self.store.rows.items()
            if base in rows
        )
        if size > self.memory_plan.needs.cache:  # another base than the plan's, with more rows
            log.info("task-vector cache skipped: needs %.2f GB, the plan has %.2f GB", size / 1e9,
                     self.memory_plan.needs.cache / 1e9)
            self._delta_base = ("skipped", base)
            return False
        self._delta_rows: dict[str, dict[str, int]] = {}
        for name, rows in self.store.rows.items():
            if base not in rows:
                continue
            members = [r for r in rows if r != base]
            base_row = self.store.row(base, name).to(self.compute_dtype)
            # in the compute dtype, as computed without the cache: results never depend on whether it fits
            per_align = ALIGN // self.compute_size  # rows on 64-byte boundaries, as every tier's tensors
            padded = -(-base_row.numel() // per_align) * per_align
            self._deltas[name] = torch.empty((len(members), padded), dtype=self.compute_dtype, device=self.device)
            self._delta_rows[name] = {ref: i for i, ref in enumerate(members)}
            for ref in members:
                torch.sub(self.store.row(ref, name), base_row, out=self._delta(ref, name))
        self._delta_base = base
        log.info("cached task vectors against '%s' (%.2f GB)", base, size / 1e9)
        return True

    @property
    def moe(self):
        """The builder of MoE candidates from these sources (made on first use)."""
        if self._moe is None:
            from evomerge.engine.moe import MoEBuilder

            self._moe = MoEBuilder(self)
        return self._moe

    def release(self) -> None:
        """Frees the resident tensors (the engine is unusable afterwards)."""
        if self._moe is not None:
            self._moe.release()
        self.store.clear()
        self.vocab_tensors.clear()
        self._vocab_maps.clear()
        self._deltas.clear()
        self.workspace.clear()
        self._model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def resolve_dtypes(reference: SourceModel, dtype, out_dtype, mergekit_exact: bool):
    """(the sources' dtype, the output's, the arithmetic's): the sources' dtype defaults to the reference
    checkpoint's. Merge arithmetic runs in float32 (float64 stays float64): half precision loses the
    small deltas; mergekit-exact merges compute as mergekit does, in the sources' dtype."""
    dtype = parse_dtype(dtype) or reference.stored_dtype()
    out = parse_dtype(out_dtype, field="out_dtype") or dtype
    return dtype, out, dtype if mergekit_exact else accumulation_dtype(dtype)


def plan_sources(sources: dict[str, SourceModel], *, reference: str, device: torch.device, present: bool,
                 dtypes: tuple[torch.dtype, torch.dtype, torch.dtype], mergekit_exact: bool, base: str | None,
                 delta_cache: bool | str = "auto", **options) -> memory.MemoryPlan:
    """The memory plan for these located sources (the engine's, and `plan_family`'s without loading):
    `dtypes` from resolve_dtypes; `options`: placement, budgets, mapped_vocab, evaluation, output_layers."""
    dtype, out_dtype, compute_dtype = dtypes
    return memory.plan_for(
        {ref: src.config for ref, src in sources.items()},
        {ref: why_not_streamable(src) for ref, src in sources.items()},
        reference=reference, device=device, present=present, dtype=dtype, out_dtype=out_dtype,
        compute_dtype=compute_dtype, base=base or reference, cache=False if mergekit_exact else delta_cache, **options)


def why_not_streamable(source: SourceModel) -> str | None:
    """None when the disk tier can stream the source's tensors from its safetensors files, else why not."""
    if source.kind != "safetensors":
        return f"{source.kind} weights are read whole (only safetensors stream)"
    if source.adapter is not None:
        return "a LoRA adapter is merged into it on load"
    if source.converted:
        return "transformers converts its tensors on load (e.g. Mixtral experts)"
    return None


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
