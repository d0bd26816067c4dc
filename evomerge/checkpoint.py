"""Checkpoint I/O: find a source model, read its config, check its tensors, load them.

Sources are local directories, single GGUF files, or Hugging Face ids already in the local
cache (downloaded only when the hub is reachable and HF_HUB_OFFLINE is not set). Weights come
from safetensors (single or sharded); pickled `.bin` weights run code on load, so they are
refused unless the caller opts in; GGUF files are dequantized through transformers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoConfig, PretrainedConfig

from evomerge.errors import CheckpointError

log = logging.getLogger(__name__)

# safetensors' names of the floating dtypes
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def plain_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of a source's config for a model of plain weights (a GGUF source's quantization setting
    dropped): what the models the engine builds from it start from."""
    import copy

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def empty_model(config: PretrainedConfig, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A model of `config` on `device` for inference, its parameters allocated but not initialised:
    whoever builds it writes every one."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights(), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # skipped under no_init_weights; tied weights must be one parameter
    model.requires_grad_(False)
    return model.eval()


@dataclass
class SourceModel:
    """A located checkpoint: where its files are and what kind they are."""

    ref: str  # as written in the recipe
    path: Path  # directory holding config and weights
    kind: str  # "safetensors" | "bin" | "gguf"
    files: list[Path] = field(default_factory=list)
    gguf_file: str | None = None
    adapter: Path | None = None  # a peft (LoRA) adapter folder applied on load: mergekit's `model+adapter`
    _config: PretrainedConfig | None = None
    _shapes: dict[str, tuple[int, ...]] | None = None

    @property
    def config(self) -> PretrainedConfig:
        if self._config is None:
            try:
                kwargs = {"gguf_file": self.gguf_file} if self.gguf_file else {}
                self._config = AutoConfig.from_pretrained(self.path, **kwargs)
            except Exception as exc:  # transformers raises many types for a broken config
                raise CheckpointError(f"model '{self.ref}': cannot read its config: {_one_line(exc)}") from None
        return self._config

    def _config_int(self, key: str) -> int:
        value = getattr(self.config, key, None)
        if not isinstance(value, int) or isinstance(value, bool):
            raise CheckpointError(f"model '{self.ref}': config has no {key}")
        if not 0 < value < 1 << 24:
            raise CheckpointError(f"model '{self.ref}': config.json {key} is {value}; it must be a count above 0")
        return value

    @property
    def num_layers(self) -> int:
        return self._config_int("num_hidden_layers")

    @property
    def vocab_size(self) -> int:
        """Rows of its embedding (its config's vocab_size)."""
        return self._config_int("vocab_size")

    def tokenizer(self):
        """Its tokenizer (from the folder, or from the GGUF file)."""
        from transformers import AutoTokenizer

        kwargs = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        try:
            return AutoTokenizer.from_pretrained(self.path, **kwargs)
        except Exception as exc:  # transformers raises many types for a broken tokenizer
            raise CheckpointError(f"model '{self.ref}': cannot load its tokenizer: {_one_line(exc)}") from None

    def _header_shapes(self) -> dict[str, tuple[int, ...]]:
        if self._shapes is None:
            shapes: dict[str, tuple[int, ...]] = {}
            for file in self.files:
                with _open_safetensors(file, self.ref) as handle:
                    for name in handle.keys():
                        shapes[name] = tuple(handle.get_slice(name).get_shape())
            self._shapes = shapes
        return self._shapes

    @cached_property
    def converted(self) -> bool:
        """Whether transformers converts this checkpoint's tensors on load: Mixtral stores each expert
        as `block_sparse_moe.experts.E.w1.weight`, which transformers 5 fuses into one parameter per
        layer, and merges (as mergekit 0.1.5 does) run on the fused parameters. Such checkpoints are
        read through transformers, which applies its own conversion."""
        if self.kind != "safetensors":
            return False
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        rules = get_checkpoint_conversion_mapping(getattr(self.config, "model_type", "")) or []
        return any(rule.rename_source_key(name)[1] is not None for rule in rules for name in self._header_shapes())

    def tensor_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """Names and shapes from the safetensors headers (no data read); None for other kinds, and
        for checkpoints transformers converts on load (checked when loaded)."""
        if self.kind != "safetensors" or self.converted:
            return None
        return self._header_shapes()

    def iter_tensors(
        self, names: set[str], dtype: torch.dtype, device: torch.device
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (name, tensor) for the requested names, one tensor in memory at a time."""
        if self.kind == "safetensors" and self.adapter is None and not self.converted:
            for file in self.files:
                with _open_safetensors(file, self.ref) as handle:
                    for name in handle.keys():
                        if name in names:
                            try:
                                tensor = handle.get_tensor(name)
                            except Exception as exc:
                                raise CheckpointError(
                                    f"model '{self.ref}': {file.name}: tensor '{name}' is unreadable "
                                    f"(truncated or corrupt file?): {_one_line(exc)}"
                                ) from None
                            yield name, tensor.to(device=device, dtype=dtype)
        elif self.kind == "bin" and self.adapter is None:
            for file in self.files:
                try:
                    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                except Exception as exc:
                    raise CheckpointError(f"model '{self.ref}': {file.name}: cannot read: {_one_line(exc)}") from None
                for name, tensor in state.items():
                    if name in names:
                        yield name, tensor.to(device=device, dtype=dtype)
                del state
        else:
            yield from self._iter_through_transformers(names, dtype, device)

    def _iter_through_transformers(self, names, dtype, device):
        """GGUF, checkpoints whose tensor names transformers renames, and models with an adapter load
        as a model. An adapter is merged in as mergekit merges it (peft's merge_and_unload on the
        model in its own dtype), once at load; nothing is written to disk."""
        from transformers import AutoModelForCausalLM

        kwargs = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        try:
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype="auto" if self.adapter else dtype, **kwargs)
        except Exception as exc:
            raise CheckpointError(f"model '{self.ref}': transformers cannot load it: {_one_line(exc)}") from None
        if self.adapter is not None:
            from peft import PeftModel

            try:
                model = PeftModel.from_pretrained(model, str(self.adapter), is_trainable=False).merge_and_unload()
            except Exception as exc:
                raise CheckpointError(f"model '{self.ref}': the adapter {self.adapter} does not apply to the model: "
                                      f"{_one_line(exc)}") from None
        for name, tensor in model.state_dict().items():
            if name in names:
                yield name, tensor.to(device=device, dtype=dtype)
        del model

    def weight_files(self) -> list[Path]:
        """Every file the weights are read from: the checkpoint's, and its adapter's."""
        if self.adapter is None:
            return list(self.files)
        return [*self.files, *sorted(self.adapter.glob("adapter_model.*")), self.adapter / "adapter_config.json"]

    def stored_dtype(self) -> torch.dtype:
        """The dtype the checkpoint declares (config), else that of its first floating tensor (float32
        for a model located from its config alone)."""
        declared = getattr(self.config, "dtype", None) or getattr(self.config, "torch_dtype", None)
        if isinstance(declared, str):
            declared = getattr(torch, declared, None)
        if isinstance(declared, torch.dtype) and declared.is_floating_point:
            return declared
        if self.kind == "safetensors" and self.files:
            with _open_safetensors(self.files[0], self.ref) as handle:
                for name in handle.keys():
                    dtype = SAFETENSORS_DTYPES.get(handle.get_slice(name).get_dtype())
                    if dtype is not None:
                        return dtype
        return torch.float32

    def tokenizer_dir(self) -> Path | None:
        if any((self.path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            return self.path
        return None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


class _open_safetensors:
    """safe_open with errors that name the model and file."""

    def __init__(self, file: Path, ref: str):
        self.file, self.ref = file, ref

    def __enter__(self):
        from safetensors import safe_open

        size = self.file.stat().st_size
        end = _safetensors_data_end(self.file, self.ref)
        if size < end:
            raise CheckpointError(
                f"model '{self.ref}': {self.file.name} is truncated ({size} bytes, its header promises {end})"
            )
        try:
            self.handle = safe_open(str(self.file), framework="pt", device="cpu")
        except Exception as exc:
            raise CheckpointError(
                f"model '{self.ref}': {self.file.name} is not a readable safetensors file "
                f"(truncated or corrupt?): {_one_line(exc)}"
            ) from None
        return self.handle

    def __exit__(self, *exc):
        self.handle = None
        return False


def _safetensors_data_end(file: Path, ref: str) -> int:
    """Bytes a safetensors file must have according to its header (see safetensors_header)."""
    data_start, header = safetensors_header(file, ref)
    return data_start + max((entry["data_offsets"][1] for entry in header.values()), default=0)


def safetensors_header(file: Path, ref: str) -> tuple[int, dict]:
    """(where the data starts, the header without its __metadata__), checked: a header that is not a
    JSON object of tensors with integer data offsets is a corrupt file, named."""
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"model '{ref}': {file.name} is not a valid safetensors file: {why}")

    size = file.stat().st_size
    with open(file, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        if size < 8 or header_len > size - 8:
            raise corrupt(f"its header length ({header_len} bytes) does not fit in the file ({size} bytes)")
        try:
            header = json.loads(handle.read(header_len))
        except ValueError:
            raise corrupt("its header is not JSON") from None
    if not isinstance(header, dict):
        raise corrupt(f"its header is a JSON {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets)):
            raise corrupt(f"tensor '{name}' has no valid data_offsets")
    return 8 + header_len, header


def split_adapter(ref: str) -> tuple[str, str | None]:
    """mergekit's `model+adapter` -> (model, adapter); (ref, None) for a plain reference."""
    if "+" not in ref or os.path.exists(os.path.expanduser(ref)):
        return ref, None
    parts = ref.split("+")
    if len(parts) != 2 or not all(parts):
        raise CheckpointError(f"model '{ref}': a LoRA reference is model+adapter, with one '+'")
    return parts[0], parts[1]


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'path_or_id@revision' -> (path_or_id, revision)."""
    if ref.count("@") > 1:
        raise CheckpointError(f"model '{ref}': more than one '@' (use path@revision)")
    if "@" in ref and not os.path.exists(ref):
        path, revision = ref.split("@")
        return path, revision
    return ref, None


def locate(ref: str, *, allow_bin: bool = False) -> SourceModel:
    """Finds a model's files from a recipe reference (`model+adapter`: the model's, and the adapter's
    folder, local or in the Hugging Face cache)."""
    model_ref, adapter_ref = split_adapter(ref)
    if adapter_ref is not None:
        base = locate(model_ref, allow_bin=allow_bin)
        return SourceModel(ref, base.path, base.kind, base.files, gguf_file=base.gguf_file,
                           adapter=_adapter_dir(ref, adapter_ref, allow_bin))
    name, revision = parse_ref(ref)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return SourceModel(ref, path.parent, "gguf", [path], gguf_file=path.name)
    if not path.is_dir():
        path = _from_hub_cache(ref, name, revision)
    return _inspect_dir(ref, path, allow_bin)


def locate_for_plan(ref: str) -> tuple[SourceModel, bool]:
    """A model located for a memory plan: (its SourceModel, whether its weights are here). A model
    whose weights are not on this machine is planned from its config alone (a local folder with a
    config.json, or a Hugging Face id whose config is in the cache): a plan for another box."""
    try:
        return locate(ref), True
    except CheckpointError as missing:
        model_ref, _adapter = split_adapter(ref)
        name, revision = parse_ref(model_ref)
        path = Path(name).expanduser()
        try:
            if not path.is_dir():
                path = _from_hub_cache(ref, name, revision, patterns=["config.json"])
        except CheckpointError:
            raise missing from None
        if not (path / "config.json").is_file():
            raise missing from None
        return SourceModel(ref, path, "safetensors"), False


def _inspect_dir(ref: str, path: Path, allow_bin: bool) -> SourceModel:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"model '{ref}': {index.name} is malformed: {_one_line(exc)}") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"model '{ref}': shard(s) listed in {index.name} are missing: {', '.join(missing)}")
        return SourceModel(ref, path, "safetensors", files)
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        return SourceModel(ref, path, "safetensors", safetensors)
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        if not allow_bin:
            raise CheckpointError(
                f"model '{ref}': only pickled .bin weights found; loading pickles can run arbitrary code. "
                "Convert to safetensors, or pass --allow-bin if you trust this model"
            )
        return SourceModel(ref, path, "bin", bins)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return SourceModel(ref, path, "gguf", ggufs, gguf_file=ggufs[0].name)
    if len(ggufs) > 1:
        raise CheckpointError(f"model '{ref}': several .gguf files; name one in the recipe: {ggufs[0]}")
    raise CheckpointError(f"model '{ref}': no weights in {path} (expected *.safetensors, pytorch_model*.bin or *.gguf)")


def _adapter_dir(ref: str, adapter_ref: str, allow_bin: bool) -> Path:
    name, revision = parse_ref(adapter_ref)
    path = Path(name).expanduser()
    if not path.is_dir():
        path = _from_hub_cache(ref, name, revision, patterns=["adapter_config.json", "adapter_model.safetensors"])
    if not (path / "adapter_config.json").is_file():
        raise CheckpointError(f"model '{ref}': {path} is not a peft adapter (no adapter_config.json)")
    if not (path / "adapter_model.safetensors").is_file():
        if (path / "adapter_model.bin").is_file() and not allow_bin:
            raise CheckpointError(f"model '{ref}': the adapter has only pickled adapter_model.bin weights; loading "
                                  "pickles can run arbitrary code. Convert to safetensors, or pass --allow-bin")
        if not (path / "adapter_model.bin").is_file():
            raise CheckpointError(f"model '{ref}': no adapter_model.safetensors in {path}")
    return path


def _from_hub_cache(ref: str, repo_id: str, revision: str | None, patterns: list[str] | None = None) -> Path:
    from huggingface_hub import snapshot_download

    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise CheckpointError(f"model '{ref}': no such directory, and not a Hugging Face id (org/name)")
    patterns = patterns or ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.gguf"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise CheckpointError(
            f"model '{ref}': not a local directory and not in the Hugging Face cache (HF_HUB_OFFLINE is set)"
        )
    try:
        log.info("downloading %s from the Hugging Face hub", repo_id)
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:
        raise CheckpointError(
            f"model '{ref}': not a local directory, not in the Hugging Face cache, and the hub did not answer: "
            f"{_one_line(exc)}"
        ) from None


def file_sha256(file: Path) -> str:
    """sha256 of a file, streamed; remembered in the cache by path, size and modification time, so
    a multi-GB source is hashed once, not on every run."""
    from filelock import FileLock

    from evomerge.paths import atomic_write_text, cache_dir

    file = Path(file).resolve()
    stat = file.stat()
    key = f"{file}:{stat.st_size}:{stat.st_mtime_ns}"
    memo = cache_dir() / "sha256.json"
    memo.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(memo) + ".lock"):
        known = json.loads(memo.read_text()) if memo.exists() else {}
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    with FileLock(str(memo) + ".lock"):
        known = json.loads(memo.read_text()) if memo.exists() else {}
        known[key] = digest.hexdigest()
        atomic_write_text(memo, json.dumps(known, indent=0))  # an interrupted write leaves the old memo
    return digest.hexdigest()


def weights_sha256(ref: str) -> str:
    """One sha256 for a model's weights: over its weight files' names and sha256s, in name order."""
    model = locate(ref, allow_bin=True)
    digest = hashlib.sha256()
    for file in sorted(model.weight_files(), key=lambda f: f.name):
        digest.update(f"{file.name}:{file_sha256(file)}\n".encode())
    return digest.hexdigest()
