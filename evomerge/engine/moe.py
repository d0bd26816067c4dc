"""Mixtures of experts built in memory, with mergekit-moe 0.1.5's semantics.

`MoEBuilder(engine)` turns a `MoEConfig` into one resident MoE model (transformers' Mixtral, Qwen2
MoE or Qwen3 MoE class): every tensor outside the MLPs from the base, each expert's MLP from its
source (or from its merge recipe, materialised by the engine first), router rows from the gates.
Nothing is written to disk; `evomerge.engine.moe_to_checkpoint` saves that same model, which is all `evomerge moe`
does. Gates computed from prompts depend on the base, the mode and the expert's own prompts only,
so each prompt set's vectors are computed once and reused by every candidate that routes with it.

Semantics taken from mergekit-moe (read, not imported): the output architecture is chosen as
mergekit chooses it (Mixtral when it fits, else the first that supports the config); `hidden`
gates run the base in bfloat16 over `bos + prompt` (left padding, pad = bos), take each layer's
input hidden state at the last token, average over the prompts, subtract the negatives', and
normalise; `cheap_embed` sums the prompts' token embeddings (float32) and normalises; an expert's
`noise_scale` adds Gaussian noise to its MLP tensors and `residual_scale` scales its down
projection; everything is cast to the output dtype last.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from evomerge.checkpoint import SourceModel, empty_model, plain_config
from evomerge.engine.plan import tensor_seed
from evomerge.errors import ArchitectureMismatch
from evomerge.moe import Expert, MoEConfig, MoEConfigError
from evomerge.recipe import evaluate_setting

log = logging.getLogger(__name__)

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _mlp_name(layer: int, projection: str) -> str:
    return f"model.layers.{layer}.mlp.{projection}.weight"


# ---------------------------------------------------------------------------- output architectures


@dataclass(frozen=True)
class OutputArchitecture:
    """One MoE family mergekit-moe 0.1.5 writes: which inputs it takes and the config it makes."""

    name: str
    inputs: tuple[str, ...]  # model types it accepts (all inputs must share one)
    shared: tuple[int, int]  # (fewest, most) shared experts
    loadable: bool = True  # transformers has its modeling code (DeepSeek MoE's lives on the hub)

    def problem(self, config: MoEConfig, types: dict[str, str]) -> str | None:
        """Why this architecture cannot build `config` (field first), or None. `types`: field -> model type."""
        shared = config.shared_experts or []
        low, high = self.shared
        if not low <= len(shared) <= high:
            wanted = "no shared experts" if high == 0 else f"exactly {low} shared expert" if low == high else \
                f"at most {high} shared expert"
            return f"shared_experts: {self.name} takes {wanted}, got {len(shared)}"
        if self.name == "Qwen MoE" and config.gate_mode != "random" and not shared[0].positive_prompts:
            return "shared_experts.0.positive_prompts: Qwen MoE gates its shared expert; give it prompts"
        if self.name == "DeepSeek MoE" and shared and (shared[0].positive_prompts or shared[0].negative_prompts):
            return "shared_experts.0.positive_prompts: DeepSeek MoE does not gate its shared expert; remove its prompts"
        base_type = types["base_model"]
        for where, model_type in types.items():
            if model_type != base_type:
                return (f"{where}: a {model_type} model, but base_model is {base_type}; {self.name} takes inputs "
                        "of one architecture")
        if base_type not in self.inputs:
            return f"base_model: a {base_type} model; {self.name} takes {' or '.join(self.inputs)} models"
        return None

    def output_config(self, base, experts: int, per_token: int):
        """The MoE's transformers config, from the base's (mergekit-moe's choices)."""
        import transformers

        def fields(config) -> dict:
            # without the source's model_type: kept as an attribute, it would make transformers save the
            # MoE under the source architecture's tensor names (fused experts instead of one per expert)
            return {k: v for k, v in config.to_dict().items() if k != "model_type"}

        if self.name == "Mixtral":
            if not isinstance(base, transformers.MistralConfig):
                mistral = transformers.MistralConfig(**fields(base))
                mistral.sliding_window = None
                mistral.max_position_embeddings = base.max_position_embeddings
                base = mistral
            out = transformers.MixtralConfig(**fields(base))
            out.architectures = ["MixtralForCausalLM"]
            out.num_local_experts = experts
            out.num_experts_per_tok = per_token
            out.sliding_window = None
        elif self.name == "Qwen MoE":
            out = transformers.Qwen2MoeConfig(**fields(base))
            out.architectures = ["Qwen2MoeForCausalLM"]
            out.num_experts, out.num_experts_per_tok = experts, per_token
            out.decoder_sparse_step, out.norm_topk_prob = 1, True
            # No sliding window (use_sliding_window false, every layer full attention), but a width for
            # it: transformers 5's Qwen MoE builds the sliding mask for every batch and refuses a padded
            # batch without one (mergekit-moe writes null, which then fails batched inference)
            out.sliding_window, out.use_sliding_window = out.max_position_embeddings, False
            out.shared_expert_intermediate_size = out.moe_intermediate_size = out.intermediate_size
        elif self.name == "Qwen3 MoE":
            out = transformers.Qwen3MoeConfig(**fields(base))
            out.architectures = ["Qwen3MoeForCausalLM"]
            out.num_experts, out.num_experts_per_tok = experts, per_token
            out.decoder_sparse_step, out.norm_topk_prob = 1, True
            out.moe_intermediate_size = out.intermediate_size
        else:
            raise MoEConfigError(f"architecture: {self.name} needs modeling code from the Hugging Face hub "
                                 "(trust_remote_code), which evomerge never runs; set architecture: qwen for a "
                                 "Qwen MoE with a shared expert, or mixtral")
        if experts & (experts - 1):
            _warn_once(f"{self.name} with {experts} experts, not a power of two: llama.cpp cannot run it")
        return out


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


# mergekit-moe's order: it prefers Mixtral, else takes the first that supports the config
ARCHITECTURES = (
    OutputArchitecture("Mixtral", ("llama", "mistral"), (0, 0)),
    OutputArchitecture("DeepSeek MoE", ("llama", "mistral"), (0, 1), loadable=False),
    OutputArchitecture("Qwen MoE", ("llama", "mistral", "qwen2"), (1, 1)),
    OutputArchitecture("Qwen3 MoE", ("qwen3",), (0, 0)),
)


def select_architecture(config: MoEConfig, types: dict[str, str]) -> OutputArchitecture:
    """The output architecture mergekit-moe would pick; a config none supports gets the reason the
    most likely one (the one asked for, else Mixtral, or Qwen MoE with shared experts) refuses it."""
    wanted = [a for a in ARCHITECTURES if not config.architecture
              or a.name.lower().startswith(config.architecture.lower())]
    if not wanted:
        raise MoEConfigError(f"architecture: {config.architecture!r} is none of "
                             f"{', '.join(a.name for a in ARCHITECTURES)}")
    fits = [a for a in wanted if a.problem(config, types) is None]
    if not fits:
        # the likely one: asked for, else one that takes the base's architecture (Mixtral first), else by
        # the shared experts
        candidates = [a for a in wanted if types["base_model"] in a.inputs] or wanted
        count = len(config.shared_experts or [])
        likely = next((a for a in candidates if a.shared[0] <= count <= a.shared[1]), candidates[0])
        problem = likely.problem(config, types)
        if likely.name == "Qwen MoE" and not config.shared_experts:
            problem += (f"; {types['base_model']} experts make a Qwen MoE, which needs one shared expert: add "
                        "shared_experts: [{source_model: ..., positive_prompts: [...]}] (in a moe: search, moe.shared: "
                        "a name in models, gated by the prompt set of that name)")
        raise MoEConfigError(problem)
    chosen = next((a for a in fits if a.name == "Mixtral"), fits[0])
    if not chosen.loadable:
        chosen.output_config(None, 0, 0)  # raises, naming what to set instead
    return chosen


def check_inputs(config: MoEConfig, sources: dict[str, SourceModel]) -> OutputArchitecture:
    """The output architecture for `config` over these located sources (configs only, nothing
    loaded): every expert (each model of an expert's recipe) must be of the base's architecture."""
    types = {"base_model": sources[config.base_model].config.model_type}
    for where, expert in config.all_experts():
        field = f"{where}.source_model" if expert.source_model is not None else f"{where}.recipe"
        found = [sources[ref].config.model_type for ref in expert.models()]
        types[field] = next((t for t in found if t != types["base_model"]), found[0])
    return select_architecture(config, types)


# ---------------------------------------------------------------------------- gates


class GateVectors:
    """Router rows from prompts, one [layers, hidden] tensor per (mode, prompt set), computed once."""

    def __init__(self, base: SourceModel, device: torch.device):
        self.base = base
        self.device = device
        self.cache: dict[tuple, torch.Tensor] = {}
        self._tokenizer = None

    def get(self, keys: list[tuple]) -> list[torch.Tensor]:
        """The vectors of these (mode, positive, negative) keys, computing the missing ones."""
        self.compute(keys)
        return [self.cache[key] for key in keys]

    def compute(self, keys: list[tuple]) -> None:
        """Computes the vectors of every (mode, positive, negative) key not yet cached, loading the
        base in bfloat16 once for all the `hidden` ones."""
        keys = [k for k in dict.fromkeys(keys) if k not in self.cache]
        if not keys:
            return
        self._check_lengths({p for _, positive, negative in keys for p in (*positive, *negative)})
        model = self._hidden_model() if any(mode.startswith("hidden") for mode, _, _ in keys) else None
        for mode, positive, negative in keys:
            def embed(prompts):
                if mode.startswith("hidden"):
                    return self._hidden(model, prompts, average=mode == "hidden_avg")
                return self._cheap_embed(prompts)

            vectors = embed(list(positive))
            if negative:
                vectors -= embed(list(negative))
            vectors /= vectors.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
            self.cache[(mode, positive, negative)] = vectors

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            tokenizer = self.base.tokenizer()
            tokenizer.padding_side = "left"
            tokenizer.pad_token_id = tokenizer.bos_token_id
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            self._tokenizer = tokenizer
        return self._tokenizer

    def _check_lengths(self, prompts: set[str]) -> None:
        """Refuses, before any forward pass, a prompt longer than the base model's context (a 2 MB prompt
        would run for minutes, then fail or read positions the model never learnt)."""
        most = getattr(self.base.config, "max_position_embeddings", None)
        if not isinstance(most, int) or most <= 0:
            return
        for prompt in sorted(prompts, key=len, reverse=True):
            if len(prompt.encode()) < most:  # nor can a shorter one: a token is at least one byte
                return
            count = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) + 1
            if count > most:
                raise MoEConfigError(f"prompts: the prompt '{prompt[:40]}...' is {count} tokens; the base model "
                                     f"'{self.base.ref}' reads at most {most}")

    def _tokenize(self, prompts: list[str]):
        tokenizer = self.tokenizer
        return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                         add_special_tokens=False)

    def _hidden_model(self) -> nn.Module:
        """The base in bfloat16, as mergekit-moe loads it for `hidden` gates."""
        model = empty_model(plain_config(self.base.config), torch.bfloat16, self.device)
        params = dict(model.named_parameters())
        for name, tensor in self.base.iter_tensors(set(params), torch.bfloat16, self.device):
            params[name].data.copy_(tensor)
        return model

    def _hidden(self, model: nn.Module, prompts: list[str], average: bool) -> torch.Tensor:
        with torch.no_grad():
            out = model(**self._tokenize(prompts).to(self.device), output_hidden_states=True, return_dict=True)
        states = torch.stack(out.hidden_states[:-1])  # each layer's input: (layers, prompts, tokens, hidden)
        states = states.sum(dim=2) / states.shape[2] if average else states[:, :, -1, :]
        return states.sum(dim=1) / states.shape[1]

    def _cheap_embed(self, prompts: list[str]) -> torch.Tensor:
        name = "model.embed_tokens.weight"
        ((_, embed),) = self.base.iter_tensors({name}, self.base.stored_dtype(), self.device)
        tokens = self._tokenize(prompts)
        rows = embed.float()[tokens["input_ids"].to(self.device)]  # each token's row, as a one-hot product gives
        summed = (rows * tokens["attention_mask"].to(self.device).unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
        unit = summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        return unit.repeat(self.base.num_layers, 1)


def key_of(mode: str, positive, negative) -> tuple:
    return (mode, tuple(positive), tuple(negative or ()))


def warn_degenerate(gates: torch.Tensor, threshold: float = 5.0) -> None:
    """mergekit-moe's warning: layers whose router rows are nearly dependent route poorly."""
    if gates.shape[1] < 2:
        return
    bad = [layer for layer in range(gates.shape[0]) if torch.linalg.cond(gates[layer].float()) > threshold]
    if bad:
        log.info("router rows of layer(s) %s are nearly dependent (condition > %g): the prompts may be too "
                 "similar, and some experts underused", ", ".join(map(str, bad)), threshold)


# ---------------------------------------------------------------------------- the builder


class MoEBuilder:
    """Builds MoE candidates from an engine's resident sources into one resident MoE model."""

    def __init__(self, engine, *, recipe_cache: int = 4):
        self.engine = engine
        self.device = engine.device
        self._gates: dict[str, GateVectors] = {}
        self._model: nn.Module | None = None
        self._model_key: tuple | None = None
        self._recipe_mlps: dict[str, dict[str, torch.Tensor]] = {}
        self._recipe_cache = recipe_cache
        self.architecture: OutputArchitecture | None = None

    # ------------------------------------------------------------------ checks

    def check(self, config: MoEConfig) -> OutputArchitecture:
        """The output architecture (every input checked), for the sources this engine holds."""
        missing = [ref for ref in config.referenced_models() if ref not in self.engine.sources]
        if missing:
            raise MoEConfigError(f"model '{missing[0]}' is not among the loaded sources")
        if config.base_model != self.engine.reference:
            raise MoEConfigError(f"base_model: '{config.base_model}', but the sources were loaded with "
                                 f"'{self.engine.reference}' as their base")
        return check_inputs(config, self.engine.sources)

    # ------------------------------------------------------------------ gates

    def _gate_vectors(self, base: str) -> GateVectors:
        if base not in self._gates:
            self._gates[base] = GateVectors(self.engine.sources[base], self.device)
        return self._gates[base]

    def prepare_gates(self, base: str, prompt_sets: list[tuple[str, list[str], list[str] | None]]) -> None:
        """Computes the gate vectors of every (mode, positive, negative) prompt set up front (a search's
        pool), loading the base once for all of them."""
        self._gate_vectors(base).compute([key_of(mode, pos, neg) for mode, pos, neg in prompt_sets])
        if prompt_sets:
            log.info("computed router rows of %d prompt set(s) from '%s'", len(prompt_sets), base)

    def router_rows(self, config: MoEConfig, seed: int) -> torch.Tensor:
        """(layers, gated experts, hidden): the routed experts' rows, then the gated shared experts'."""
        gated = [*config.experts, *config.gated_shared()]
        base = self.engine.sources[config.base_model]
        layers, hidden = base.num_layers, base.config.hidden_size
        if config.routed_by_prompts:
            keys = [key_of(config.gate_mode, e.positive_prompts, e.negative_prompts) for e in gated]
            rows = torch.stack(self._gate_vectors(config.base_model).get(keys), dim=1)
        else:
            generator = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same gates on every device
            shape = (layers, len(gated), hidden)
            if config.gate_mode == "random":
                rows = torch.randn(shape, generator=generator)
            else:
                bound = math.sqrt(1.0 / hidden)
                rows = torch.rand(shape, generator=generator) * 2 * bound - bound
            rows = rows.to(self.device)
        warn_degenerate(rows)
        return rows

    # ------------------------------------------------------------------ expert tensors

    def _expert_tensors(self, where: str, expert: Expert, seed: int) -> Callable[[int, str], torch.Tensor]:
        """(layer, projection) -> the expert's MLP tensor in the engine's dtype, noised and scaled."""
        if expert.source_model is not None:
            ref = expert.source_model
            raw = lambda layer, projection: self.engine.source_tensor(ref, _mlp_name(layer, projection))  # noqa: E731
        else:
            mlps = self._recipe_mlp(where, expert, seed)
            raw = lambda layer, projection: mlps[_mlp_name(layer, projection)]  # noqa: E731

        def tensor(layer: int, projection: str) -> torch.Tensor:
            out = raw(layer, projection).to(device=self.device, dtype=self.engine.dtype)
            if expert.noise_scale is not None:
                generator = torch.Generator(device=self.device).manual_seed(
                    tensor_seed(seed, f"{where}.{_mlp_name(layer, projection)}"))
                noise = torch.randn(out.shape, generator=generator, device=self.device, dtype=out.dtype)
                out = out + noise * expert.noise_scale
            if projection == "down_proj" and expert.residual_scale is not None:
                out = out * expert.residual_scale
            return out

        return tensor

    def _recipe_mlp(self, where: str, expert: Expert, seed: int) -> dict[str, torch.Tensor]:
        """The MLP tensors of an expert's merge recipe, materialised by the engine (kept for reuse)."""
        from evomerge.errors import EvomergeError

        key = f"{seed}\n{expert.recipe.to_yaml()}"
        if key not in self._recipe_mlps:
            if len(self._recipe_mlps) >= self._recipe_cache:
                self._recipe_mlps.pop(next(iter(self._recipe_mlps)))
            try:
                model = self.engine.materialize(expert.recipe, seed=seed)
            except EvomergeError as exc:
                raise type(exc)(f"{where}.recipe: {exc}") from None
            if model.config.num_hidden_layers != self.engine.model_layers[self.engine.reference]:
                raise MoEConfigError(f"{where}.recipe: gives {model.config.num_hidden_layers} layers, the base has "
                                     f"{self.engine.model_layers[self.engine.reference]}")
            self._recipe_mlps[key] = {name: p.detach().to(self.engine.dtype, copy=True)
                                      for name, p in model.named_parameters() if ".mlp." in name}
        return self._recipe_mlps[key]

    # ------------------------------------------------------------------ the model

    def _model_for(self, architecture: OutputArchitecture, config: MoEConfig) -> nn.Module:
        """The resident MoE model, rebuilt only when the architecture or the expert counts change."""
        key = (architecture.name, len(config.experts), config.experts_per_token)
        if self._model is None or self._model_key != key:
            self._model = None  # the old one goes first
            base = self.engine._config(self.engine.model_layers[self.engine.reference])
            out = architecture.output_config(base, len(config.experts), config.experts_per_token)
            out.dtype = self.engine.out_dtype
            self._model, self._model_key = empty_model(out, self.engine.out_dtype, self.device), key
        return self._model

    def materialize(self, config: MoEConfig, seed: int = 0, *, progress: bool = False) -> nn.Module:
        """Writes the MoE `config` into the resident MoE model and returns it."""
        from tqdm.auto import tqdm

        from evomerge.errors import MergeFailure

        architecture = self.check(config)
        self.architecture = architecture
        rows = self.router_rows(config, seed)
        routed, gated_shared = len(config.experts), len(config.gated_shared())
        experts = [self._expert_tensors(f"experts.{i}", e, seed) for i, e in enumerate(config.experts)]
        shared = [self._expert_tensors(f"shared_experts.{i}", e, seed) for i, e in enumerate(config.shared_experts or [])]
        layers = self.engine.model_layers[self.engine.reference]
        model = self._model_for(architecture, config)
        scales = [_gate_scales(e.gate_scale, layers) for e in [*config.experts, *config.gated_shared()]]
        base = config.base_model
        with torch.no_grad():
            for name, param in tqdm(list(model.named_parameters()), desc="building MoE", unit="tensor",
                                    disable=not progress):
                target = param.data
                if ".mlp." not in name:
                    if name in self.engine.shapes:
                        target.copy_(self.engine.source_tensor(base, name))
                    elif name.endswith("_proj.bias"):
                        target.zero_()  # Qwen2 MoE has attention biases a Llama base lacks (as mergekit)
                    else:
                        raise ArchitectureMismatch(f"base_model: '{base}' has no tensor '{name}' for the "
                                                   f"{architecture.name} output")
                    continue
                layer = int(name.split(".")[2])
                part = name.split(".mlp.", 1)[1]
                if part == "gate.weight":
                    _rows(target, rows[layer, :routed], scales[:routed], layer)
                elif part == "shared_expert_gate.weight":
                    _rows(target, rows[layer, routed:routed + gated_shared], scales[routed:], layer)
                elif part == "experts.gate_up_proj":
                    half = target.shape[1] // 2
                    for e, tensors in enumerate(experts):
                        target[e, :half].copy_(tensors(layer, "gate_proj"))
                        target[e, half:].copy_(tensors(layer, "up_proj"))
                elif part == "experts.down_proj":
                    for e, tensors in enumerate(experts):
                        target[e].copy_(tensors(layer, "down_proj"))
                elif part.startswith("shared_expert."):
                    target.copy_(shared[0](layer, part.split(".")[1]))
                else:
                    raise ArchitectureMismatch(f"{architecture.name}: no rule for MoE tensor '{name}'")
                if not bool(torch.isfinite(target).all()):
                    raise MergeFailure(f"the MoE has NaN/inf in tensor {name}")
        return model

    def release(self) -> None:
        self._model = None
        self._recipe_mlps.clear()
        self._gates.clear()


def _gate_scales(setting, layers: int) -> Callable[[int], float] | None:
    if setting is None:
        return None
    return lambda layer: evaluate_setting(setting, "", layer / (layers - 1) if layers > 1 else 0.0, float)


def _rows(target: torch.Tensor, rows: torch.Tensor, scales: list, layer: int) -> None:
    """Router rows into a gate weight, each scaled by its expert's gate_scale at this layer (if any)."""
    for i, scale in enumerate(scales[: rows.shape[0]]):
        row = rows[i] if scale is None else rows[i].float() * scale(layer)
        target[i].copy_(row)


def config_dtype(source: SourceModel) -> str | None:
    """The base config's dtype (what mergekit-moe gives the MoE when its config names none)."""
    from evomerge.device import DTYPES

    value = getattr(source.config, "dtype", None) or getattr(source.config, "torch_dtype", None)
    name = None if value is None else str(value).removeprefix("torch.")
    return name if name in DTYPES else None
