"""The memory planner: what a search holds, where, and whether it fits, before anything loads.

Parts are counted in bytes from the models' configs alone (a model built on PyTorch's meta
device has every parameter's shape and no storage): the sources, the task-vector cache, the
resident output model, evaluation (KV cache and activations at the batch size), scratch for the
merge kernels and, when sources live off the device, staging for their copies. Each source is
then placed on the fastest tier that fits:

- `device`: resident on the device, stacked per tensor (one read per candidate at device speed);
- `host`:   held in host memory (pinned when the device is CUDA) and copied to the device tensor
            by tensor, the next tensor's copy overlapping the current one's merge;
- `disk`:   its safetensors files memory-mapped and streamed tensor by tensor; resident memory
            stays at one job's inputs whatever the size of the family.

When nothing fits, the error names the largest consumer and the setting that would make it fit.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field

import torch

from evomerge.errors import DoesNotFit, EvomergeError

log = logging.getLogger(__name__)

TIERS = ("device", "host", "disk")
PLACEMENTS = ("auto", *TIERS)

# Evaluation context when the caller gives none: lm-eval's default max_length, capped by the model's.
DEFAULT_EVAL_TOKENS = 2048
# What is kept free on each pool besides the planned parts (allocator fragmentation, the CUDA
# context, libraries): plans use at most this fraction of the free memory.
USABLE_FRACTION = 0.9

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def memory_size(text: str | int | float) -> int:
    """'80GB', '80 GiB', '512MB', 8e10 -> bytes (decimal units: 80GB = 80e9 bytes, as GPU makers count);
    ValueError saying what is wrong otherwise."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        unit = match and match.group(2).lower()
        if not match or unit not in _UNITS:
            raise ValueError(f"not a memory size: {text!r} (e.g. 80GB, 24GiB, 512MB)")
        value = float(match.group(1)) * _UNITS[unit]
    if not value > 0 or math.isinf(value):
        raise ValueError(f"must be above 0, got {text!r}")
    return int(value)


def parse_bytes(text: str | int | float | None, *, field: str) -> int | None:
    """memory_size, None for None, and errors that name the field."""
    if text is None:
        return None
    try:
        return memory_size(text)
    except ValueError as exc:
        raise EvomergeError(f"{field}: {exc}") from None


def gb(n: float) -> str:
    """Bytes as GB (MB below 1 GB: a tiny family's plan still says something)."""
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e9 or n == 0 else f"{n / 1e6:.1f} MB"


# ---------------------------------------------------------------------------------- byte counts

def parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model a config describes (tied weights once), built on the meta
    device: shapes without storage, so a 70B config costs nothing."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def tensor_bytes(shapes, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(shape) * size for shape in shapes)


def evaluation_bytes(config, dtype: torch.dtype, batch: int, tokens: int, device_type: str) -> dict[str, int]:
    """Evaluation's peak beside the model, for `batch` sequences of `tokens`: the KV cache transformers
    builds during the forward pass (2 x layers x batch x tokens x kv heads x head dim), the logits with
    lm-eval's log-softmax of them, and one layer's activations (its MLP's intermediate and the attention
    inputs; the CPU's attention materialises the score matrix, CUDA's fused kernels do not)."""
    size = torch.empty((), dtype=dtype).element_size()
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layers = config.num_hidden_layers
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    kv = 2 * layers * batch * tokens * kv_heads * head_dim * size
    logits = batch * tokens * config.vocab_size * (size + 4)  # the logits, and their float32 log-softmax
    layer = batch * tokens * (3 * intermediate + 6 * hidden) * size
    if device_type != "cuda":
        layer += batch * heads * tokens * tokens * 4
    return {"kv_cache": kv, "activations": logits + layer}


def scratch_bytes(largest: int, inputs: int, compute_size: int = 4) -> int:
    """Scratch of the merge kernels for the largest tensor (`largest` entries) with `inputs` sources:
    the working copies, task vectors and masks of every input and the method's few temporaries.
    Measured on the tiny family with 4 sources: the workspace TIES/DARE/DELLA keep is 10-11.3 x the
    largest tensor in float32, and the task vectors they allocate per job 3 x more; this is 3n + 4."""
    return largest * (3 * inputs + 4) * compute_size


def count_needs(
    configs: dict[str, object],
    *,
    reference: str,
    dtype: torch.dtype,
    out_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    base: str | None,
    streamable: dict[str, str | None],
    mapped_vocab: bool = False,
    output_layers: int | None = None,
    evaluation: tuple[int, int] | None = None,
    device_type: str = "cpu",
) -> Needs:
    """The byte counts of a family, from its configs (nothing loaded).

    configs: model ref -> its transformers config; streamable: ref -> None when its safetensors can
    be streamed, else why not; mapped_vocab: a tokenizer setting maps embedding rows (those stay on
    the device); output_layers: the largest output (layer stacking), default the reference's;
    evaluation: (batch, tokens) the evaluator runs, None for a merge without evaluation.
    """
    import copy

    size = torch.empty((), dtype=dtype).element_size()
    compute = torch.empty((), dtype=compute_dtype).element_size()
    shapes = {ref: parameter_shapes(config) for ref, config in configs.items()}
    sources = []
    for ref, config in configs.items():
        vocab = 0
        if mapped_vocab:
            tied = getattr(config, "tie_word_embeddings", False)
            vocab = config.vocab_size * config.hidden_size * size * (1 if tied else 2)
        why = streamable.get(ref)
        sources.append(SourceNeed(ref, tensor_bytes(shapes[ref].values(), dtype), why is None, why or "", vocab))
    out_config = copy.deepcopy(configs[reference])
    if output_layers and output_layers != out_config.num_hidden_layers:
        out_config.num_hidden_layers = output_layers
        if isinstance(getattr(out_config, "layer_types", None), list):
            out_config.layer_types = (out_config.layer_types * output_layers)[:output_layers]
    model = tensor_bytes(parameter_shapes(out_config).values(), out_dtype)
    largest = max(math.prod(shape) for by_ref in shapes.values() for shape in by_ref.values())
    cache = 0
    if base is not None:
        base_entries = sum(math.prod(s) for s in shapes[base].values())
        cache = sum(min(base_entries, sum(math.prod(s) for s in shapes[ref].values())) * compute
                    for ref in configs if ref != base)
        if mapped_vocab:  # mapped vocabulary tensors have no cached task vectors
            cache -= sum(s.device_bytes // size * compute for s in sources if s.ref != base)
    needs = Needs(sources=sources, model=model, scratch=scratch_bytes(largest, len(configs), compute), cache=cache)
    needs.read_buffers = 2 * len(configs) * largest * size
    if device_type == "cuda":
        needs.staging = 2 * len(configs) * largest * size
    if evaluation is not None:
        batch, tokens = evaluation
        tokens = needs_tokens(configs[reference], tokens)
        needs.evaluation = evaluation_bytes(out_config, out_dtype, batch, tokens, device_type)
        needs.eval_text = f"batch {batch} x {tokens} tokens"
    return needs


# ---------------------------------------------------------------------------------- bandwidths

@dataclass(frozen=True)
class Bandwidths:
    """Bytes per second of each tier into the merge; `measured` names those timed on this machine,
    the others are the nominal figures stated in `source`."""

    device: float
    host: float
    disk: float
    measured: tuple[str, ...] = ()
    source: str = ""


_NOMINAL = {
    # spec-sheet figures, used only to predict for a device this machine does not have
    "cuda": dict(device=2.0e12, host=25e9, disk=2.0e9,
                 source="nominal: HBM ~2 TB/s, PCIe 4.0 x16 25 GB/s pinned, NVMe 2 GB/s"),
    "cpu": dict(device=10e9, host=10e9, disk=2.0e9, source="nominal: DRAM 10 GB/s, NVMe 2 GB/s"),
}
_measured: dict[str, Bandwidths] = {}


def bandwidths(device: torch.device, *, present: bool) -> Bandwidths:
    """Measured copy bandwidths when the device is on this machine (a 64 MB copy, once per process),
    else the nominal ones. Disk stays nominal (cold reads; a warm page cache reads at host speed)."""
    key = str(device)
    nominal = _NOMINAL["cuda" if device.type == "cuda" else "cpu"]
    if not present:
        return Bandwidths(**nominal)
    if key not in _measured:
        n = 1 << 24  # 16M float32 entries = 64 MB: well past the caches
        src = torch.ones(n, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)  # first touch
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        device_bw = 2 * src.numel() * 4 / (time.perf_counter() - start)  # read + write
        host_bw = device_bw
        measured = ["device"]
        if device.type == "cuda":
            pinned = torch.ones(n, dtype=torch.float32).pin_memory()
            dst.copy_(pinned, non_blocking=True)
            _sync(device)
            start = time.perf_counter()
            dst.copy_(pinned, non_blocking=True)
            _sync(device)
            host_bw = pinned.numel() * 4 / (time.perf_counter() - start)
            del pinned
        measured.append("host")
        del src, dst
        _measured[key] = Bandwidths(device_bw, host_bw, nominal["disk"], tuple(measured),
                                    "measured on this machine; disk nominal 2 GB/s (cold NVMe)")
    return _measured[key]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class SourceNeed:
    """What one source costs: `bytes` in the engine's dtype; `streamable` when its tensors can be
    read from safetensors by offset (else the disk tier cannot hold it, `why_not` says why);
    `device_bytes`: what stays on the device whatever its tier (vocabulary rows being remapped)."""

    ref: str
    bytes: int
    streamable: bool = True
    why_not: str = ""
    device_bytes: int = 0


@dataclass
class Needs:
    """Everything the planner counts, in bytes."""

    sources: list[SourceNeed]
    model: int
    evaluation: dict[str, int] = field(default_factory=dict)
    scratch: int = 0
    staging: int = 0  # CUDA, sources off the device: the largest job's inputs on the device, current and next
    read_buffers: int = 0  # disk tier: the largest job's inputs in host memory, current and next
    cache: int = 0  # task vectors against the base (0: no base)
    eval_text: str = ""  # e.g. "batch 32 x 2048 tokens"


@dataclass
class MemoryPlan:
    device: str
    placement: str
    device_budget: int
    host_budget: int
    shared_pool: bool  # a CPU device: the device and the host are one memory
    needs: Needs
    tiers: dict[str, str]  # source -> tier
    cache: bool
    present: bool  # the device is on this machine: bandwidths are measured (on first need), else nominal
    notes: list[str] = field(default_factory=list)
    _bandwidths: Bandwidths | None = None

    @property
    def bandwidths(self) -> Bandwidths:
        if self._bandwidths is None:
            self._bandwidths = bandwidths(torch.device(self.device), present=self.present)
        return self._bandwidths

    def on(self, tier: str) -> list[SourceNeed]:
        return [s for s in self.needs.sources if self.tiers[s.ref] == tier]

    @property
    def device_parts(self) -> dict[str, int]:
        n = self.needs
        parts = {
            "sources (device tier)": sum(s.bytes for s in self.on("device"))
            + sum(s.device_bytes for s in self.needs.sources if self.tiers[s.ref] != "device"),
            "task-vector cache": n.cache if self.cache else 0,
            "resident model": n.model,
            **{f"evaluation {k.replace('_', ' ')}": v for k, v in n.evaluation.items()},
            "merge scratch": n.scratch,
            "staging (host/disk tiers)": n.staging if self.off_device else 0,
        }
        return parts

    @property
    def host_parts(self) -> dict[str, int]:
        return {"sources (host tier)": sum(s.bytes - s.device_bytes for s in self.on("host")),
                "disk-tier read buffers": self.needs.read_buffers if self.on("disk") else 0}

    @property
    def off_device(self) -> bool:
        return any(t != "device" for t in self.tiers.values())

    @property
    def device_total(self) -> int:
        return sum(self.device_parts.values())

    @property
    def host_total(self) -> int:
        return sum(self.host_parts.values())

    def seconds_per_candidate(self) -> dict[str, float]:
        """The bandwidth bound of one merge: every source read once from its tier and the output
        written once; host and disk copies overlap the device's work, so the slowest stream bounds it.
        Real methods read more (TIES: masks, DARE: draws); docs/benchmarks.md has measured ratios."""
        bw = self.bandwidths
        device = (sum(s.bytes for s in self.on("device")) + 2 * self.needs.model) / bw.device
        host = sum(s.bytes for s in self.on("host")) / bw.host
        disk = sum(s.bytes for s in self.on("disk")) / bw.disk
        if self.shared_pool:  # one memory: host-tier reads are device reads
            device, host = device + host, 0.0
        return {"device": device, "host": host, "disk": disk, "total": max(device, host, disk)}

    def render(self) -> str:
        lines = [f"memory plan (placement: {self.placement}) on {self.device}: "
                 f"{gb(self.device_total)} of {gb(self.device_budget)} usable"
                 + (" (one pool: the CPU is the device and the host)" if self.shared_pool else
                    f"; host {gb(self.host_total)} of {gb(self.host_budget)} usable")]
        for name, size in self.device_parts.items():
            if size:
                extra = f"  ({self.needs.eval_text})" if name.startswith("evaluation") and self.needs.eval_text else ""
                lines.append(f"  device  {name:<28s} {gb(size):>10s}{extra}")
        if self.needs.cache and not self.cache:
            lines.append(f"  device  {'task-vector cache':<28s} {'off':>10s}  (would need {gb(self.needs.cache)})")
        for name, size in self.host_parts.items():
            if size:
                lines.append(f"  {'device' if self.shared_pool else 'host':<6s}  {name:<28s} {gb(size):>10s}")
        disk = sum(s.bytes for s in self.on("disk"))
        if disk:
            lines.append(f"  disk    {'sources (memory-mapped)':<28s} {gb(disk):>10s}  (streamed: not resident)")
        lines.append("  sources:")
        for s in self.needs.sources:
            lines.append(f"    {self.tiers[s.ref]:<6s} {gb(s.bytes):>10s}  {s.ref}")
        t = self.seconds_per_candidate()
        bw = self.bandwidths
        lines.append(
            f"  merge >= {t['total']:.2f} s/candidate (bandwidth bound; device {t['device']:.2f} s at "
            f"{bw.device / 1e9:.0f} GB/s" + (f", host {t['host']:.2f} s at {bw.host / 1e9:.0f} GB/s" if t["host"] else "")
            + (f", disk {t['disk']:.2f} s at {bw.disk / 1e9:.1f} GB/s" if t["disk"] else "")
            + f"; {bw.source}); evaluation not included")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def plan_memory(
    needs: Needs,
    *,
    device: torch.device,
    placement: str = "auto",
    device_budget: int,
    host_budget: int,
    base: str | None = None,
    cache: bool | str = "auto",
    present: bool = True,
    bw: Bandwidths | None = None,
    eval_option=None,
) -> MemoryPlan:
    """Places every source; raises DoesNotFit naming the largest consumer when nothing fits.

    device_budget / host_budget: free bytes of each pool (USABLE_FRACTION of it is planned).
    cache: the task-vector cache: True (required), False, or "auto" (when it fits on the device).
    eval_option: f(budget_left) -> a setting that makes evaluation fit (e.g. "batch_size: 4"), or None.
    """
    if placement not in PLACEMENTS:
        raise EvomergeError(f"placement: must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    shared = device.type != "cuda"
    device_usable = int(device_budget * USABLE_FRACTION)
    host_usable = device_usable if shared else int(host_budget * USABLE_FRACTION)
    plan = MemoryPlan(str(device), placement, device_usable, host_usable, shared, needs, {}, False, present,
                      _bandwidths=bw)

    # What the device holds whatever the placement: the model, evaluation, scratch, staging.
    fixed = {"the resident model": needs.model, "evaluation": sum(needs.evaluation.values()),
             "merge scratch": needs.scratch}
    fixed_total = sum(fixed.values()) + sum(s.device_bytes for s in needs.sources)  # + vocabulary rows
    if fixed_total > device_usable:
        name, size = max(fixed.items(), key=lambda kv: kv[1])
        option = None
        if name == "evaluation" and eval_option is not None:
            option = eval_option(device_usable - (fixed_total - fixed["evaluation"]))
        option = option or f"a device with at least {gb(fixed_total / USABLE_FRACTION)} free"
        raise DoesNotFit(
            f"{device}: {gb(device_usable)} usable ({gb(device_budget)} free), but the resident model, evaluation "
            f"and scratch alone need {gb(fixed_total)}; the largest consumer is {name} ({gb(size)}): {option} would fit"
        )

    def place(tiers: dict[str, str]) -> bool:
        """Makes `tiers` the plan's; whether both pools hold it."""
        plan.tiers = tiers
        return plan.device_total <= device_usable and (
            plan.device_total + plan.host_total <= device_usable if shared else plan.host_total <= host_usable)

    order = sorted(needs.sources, key=lambda s: (s.ref != base,))  # the base first: every job reads it
    if placement == "auto":
        tiers = {s.ref: "disk" if s.streamable else "host" for s in needs.sources}
        for tier in (("device",) if shared else ("device", "host")):
            for s in order:
                if TIERS.index(tier) < TIERS.index(tiers[s.ref]) and place({**tiers, s.ref: tier}):
                    tiers = plan.tiers
    else:
        tiers = {}
        for s in needs.sources:
            if placement == "disk" and not s.streamable:
                tiers[s.ref] = "host"
                plan.notes.append(f"model '{s.ref}' is held on the host tier: {s.why_not}")
            else:
                tiers[s.ref] = placement
    if not place(tiers):
        raise DoesNotFit(_nothing_fits(plan, needs, device_usable, host_usable, shared))
    if any(t == "disk" for t in plan.tiers.values()):
        plan.notes.append("disk tier: merges read the sources' files each candidate; a warm page cache makes "
                          "that host-speed, a cold disk its read speed")

    # The task-vector cache: only over device-resident sources with a base among them.
    if needs.cache and cache is not False:
        all_device = all(t == "device" for t in plan.tiers.values())
        room = device_usable - plan.device_total - (0 if not shared else plan.host_total)
        if all_device and needs.cache <= room:
            plan.cache = True
        elif cache is True:
            raise DoesNotFit(
                f"delta_cache: the task-vector cache needs {gb(needs.cache)} on {device} but "
                + (f"only {gb(max(room, 0))} is left" if all_device else "sources are off the device")
                + "; drop delta_cache: true (the cache only saves a subtraction per tensor)")
        else:
            plan.notes.append(f"task-vector cache off: needs {gb(needs.cache)}, "
                              + (f"{gb(max(room, 0))} left" if all_device else "sources are off the device"))
    return plan


def _nothing_fits(plan: MemoryPlan, needs: Needs, device_usable: int, host_usable: int, shared: bool) -> str:
    """The error for a placement whose sources do not fit: the largest consumer, and a placement that fits."""
    parts = {**plan.device_parts, **plan.host_parts}
    name, size = max(parts.items(), key=lambda kv: kv[1])
    where = (f"{plan.device}: {gb(plan.device_total + (plan.host_total if shared else 0))} needed, "
             f"{gb(device_usable)} usable" if shared or plan.device_total > device_usable
             else f"host: {gb(plan.host_total)} needed, {gb(host_usable)} usable")
    suggestion = None
    for option in ("host", "disk"):
        if TIERS.index(option) <= TIERS.index(plan.placement if plan.placement != "auto" else "device"):
            continue
        try:
            plan_memory(needs, device=torch.device(plan.device), placement=option,
                        device_budget=int(device_usable / USABLE_FRACTION), host_budget=int(host_usable / USABLE_FRACTION),
                        cache=False, present=plan.present, bw=plan._bandwidths)
        except DoesNotFit:
            continue
        suggestion = f"placement: {option} (--placement {option}) fits"
        break
    if suggestion is None:
        blockers = [s.ref for s in needs.sources if not s.streamable]
        suggestion = (f"no placement fits: model(s) {', '.join(blockers)} cannot be streamed from disk "
                      f"({next(s.why_not for s in needs.sources if not s.streamable)}); convert them to safetensors"
                      if blockers else "no placement fits: free memory or use a larger device")
    return f"{where} (placement: {plan.placement}); the largest consumer is {name} ({gb(size)}): {suggestion}"


# ---------------------------------------------------------------------------------- entry points

def plan_for(
    configs: dict[str, object],
    streamable: dict[str, str | None],
    *,
    reference: str,
    device: torch.device,
    present: bool,
    dtype: torch.dtype,
    out_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    base: str | None,
    placement: str = "auto",
    device_memory: int | str | None = None,
    host_memory: int | str | None = None,
    mapped_vocab: bool = False,
    output_layers: int | None = None,
    evaluation: tuple[int, int] | None = None,
    cache: bool | str = "auto",
) -> MemoryPlan:
    """Counts the family's needs and places it, against the given budgets or the free memory now.
    `present`: the device is on this machine (its free memory and bandwidth are measured)."""
    from evomerge.device import available_bytes

    device_budget = parse_bytes(device_memory, field="device_memory")
    if device_budget is None:
        if not present:
            raise EvomergeError(f"device_memory: {device} is not on this machine; give its memory to plan for it "
                                "(e.g. --device-memory 80GB)")
        device_budget = available_bytes(device)
    host_budget = parse_bytes(host_memory, field="host_memory") or available_bytes(torch.device("cpu"))
    needs = count_needs(configs, reference=reference, dtype=dtype, out_dtype=out_dtype, compute_dtype=compute_dtype,
                        base=base, streamable=streamable, mapped_vocab=mapped_vocab, output_layers=output_layers,
                        evaluation=evaluation, device_type=device.type)

    def batch_option(room: int) -> str | None:
        """The largest batch size whose evaluation fits in `room` bytes."""
        batch, tokens = evaluation
        config = configs[reference]
        for smaller in range(batch - 1, 0, -1):
            if sum(evaluation_bytes(config, out_dtype, smaller, needs_tokens(config, tokens), device.type).values()) <= room:
                return f"batch_size: {smaller}"
        return None

    return plan_memory(needs, device=device, placement=placement, device_budget=device_budget,
                       host_budget=host_budget, base=base, cache=cache, present=present,
                       eval_option=batch_option if evaluation is not None else None)


def needs_tokens(config, tokens: int) -> int:
    return min(tokens, getattr(config, "max_position_embeddings", None) or tokens)
