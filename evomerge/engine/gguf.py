"""GGUF: a merged checkpoint folder written as llama.cpp's single-file format.

The one module that knows GGUF. It follows llama.cpp's converter (`convert_hf_to_gguf.py`): the
architecture's metadata keys, llama.cpp's tensor names (from the `gguf` package's own name map),
Llama's rotary permutation of the query and key rows, the vocabulary as `gpt2` BPE with the
pre-tokenizer llama.cpp needs, the special tokens and the chat template; norms and biases stay F32.

Types written here with the `gguf` package: f32, f16, bf16, q8_0 and the 4/5-bit block types
q4_0, q4_1, q5_0, q5_1 (whose output layer, or tied embedding, is kept at q8_0, the higher
precision llama.cpp's own quantizer keeps it at when its K-quant does not fit). K-quants
(q4_k_m, …) are made by llama.cpp's `llama-quantize` from an f16/bf16 file when it is on PATH.

Tensors are read one at a time from the checkpoint's safetensors and streamed to the file, so a
7B model needs one tensor's worth of memory, not the model's.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import subprocess
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.paths import atomic_file

log = logging.getLogger(__name__)


class GGUFError(EvomergeError):
    """A checkpoint cannot be written as GGUF (architecture, tokenizer or type not supported)."""


# Types the gguf package writes itself, with llama.cpp's `general.file_type` for each.
_BASIC = {
    "f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
}
_LOW_BIT = {"q4_0", "q4_1", "q5_0", "q5_1"}  # their output layer is kept at q8_0
# Types only llama.cpp's quantizer makes (its names, lower case).
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
TYPES = tuple(_BASIC) + K_QUANTS
QUANTIZE_TOOL = "llama-quantize"


@dataclass(frozen=True)
class _Arch:
    gguf: str  # llama.cpp's architecture name
    permute_qk: bool  # Llama's rotary layout: llama.cpp interleaves the halves of each head


# Hugging Face model_type -> llama.cpp architecture. Dense decoders with SiLU-gated MLPs and RMSNorm.
ARCHITECTURES = {
    "llama": _Arch("llama", True),
    "mistral": _Arch("llama", True),  # llama.cpp runs Mistral as llama
    "qwen2": _Arch("qwen2", False),
    "qwen3": _Arch("qwen3", False),
}

# llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) by hashing the token ids
# of one test text. Hashes and names from llama.cpp's converter (MIT, The ggml authors), for the
# families evomerge exports; the text is its `chktxt`.
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/2/2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
}
_GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "use_regex": True}


def check_types(types: list[str] | tuple[str, ...]) -> list[str]:
    """The requested types, checked before any merge runs: known names, and llama-quantize on PATH
    for K-quants."""
    checked: list[str] = []
    for name in types:
        kind = str(name).strip().lower()
        if kind not in TYPES:
            raise GGUFError(f"--gguf {name}: unknown type; choose from {', '.join(TYPES)}")
        if kind in K_QUANTS and shutil.which(QUANTIZE_TOOL) is None:
            raise GGUFError(
                f"--gguf {name}: K-quants are made by llama.cpp's {QUANTIZE_TOOL}, which is not on PATH; "
                f"build llama.cpp (cmake --build build --target llama-quantize) and add it to PATH, "
                f"or choose one of {', '.join(_BASIC)}"
            )
        if kind not in checked:
            checked.append(kind)
    return checked


def check_config(config, model: str) -> _Arch:
    """The llama.cpp architecture for a Hugging Face config, or a one-line error naming what is not
    supported."""
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise GGUFError(f"GGUF export of '{model}': architecture '{model_type}' is not supported "
                        f"(supported: {', '.join(ARCHITECTURES)}); convert the exported checkpoint with llama.cpp's "
                        "convert_hf_to_gguf.py")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise GGUFError(f"GGUF export of '{model}': hidden_act '{act}' is not what llama.cpp's {arch.gguf} runs (silu)")
    scaling = _rope_scaling(config)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default", "linear", "llama3"):
        raise GGUFError(f"GGUF export of '{model}': rope_scaling type "
                        f"'{scaling.get('rope_type', scaling.get('type'))}' is not supported (default, linear, llama3)")
    return arch


def _rope_scaling(config) -> dict:
    scaling = getattr(config, "rope_scaling", None) or {}
    return dict(scaling) if isinstance(scaling, dict) else {}


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # newer transformers keep it in rope_parameters
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def write_ggufs(checkpoint: Path, types: list[str], stem: str, *,
                progress: bool = True) -> tuple[list[Path], dict[str, str]]:
    """One `<stem>-<TYPE>.gguf` per type inside `checkpoint` (a folder `save_pretrained` wrote):
    (the files written, {type: why not} for each type that could not be written; one refused type
    costs neither the checkpoint nor the other types)."""
    written, refused = [], {}
    for kind in types:
        if kind in K_QUANTS:
            continue
        try:
            written.append(write_gguf(checkpoint, checkpoint / f"{stem}-{kind.upper()}.gguf", kind, progress=progress))
        except GGUFError as exc:  # named as the output is (the checkpoint is written in a scratch folder)
            refused[kind] = str(exc).replace(f"'{checkpoint.name}'", f"'{stem}'")
    kquants = [kind for kind in types if kind in K_QUANTS]
    if not kquants:
        return written, refused
    source = _intermediate_type(checkpoint)  # llama-quantize's input: one written above, else a scratch file
    base = checkpoint / f"{stem}-{source.upper()}.gguf"
    scratch = base not in written
    try:
        if scratch:
            base = write_gguf(checkpoint, checkpoint / f".{stem}-{source}.for-llama-quantize.gguf", source,
                              progress=progress)
        for kind in kquants:
            try:
                written.append(quantize(base, checkpoint / f"{stem}-{kind.upper()}.gguf", kind))
            except GGUFError as exc:
                refused[kind] = str(exc).replace(f"'{checkpoint.name}'", f"'{stem}'")
    except GGUFError as exc:
        refused.update({kind: str(exc).replace(f"'{checkpoint.name}'", f"'{stem}'") for kind in kquants
                        if kind not in refused})
    finally:
        if scratch:
            base.unlink(missing_ok=True)
    return written, refused


def gguf_card(files: list[Path], refused: dict[str, str] | None = None) -> str:
    """The model card's section on the GGUF files: what each is and how to run it (and which types
    could not be written, and why)."""
    if refused and not files:
        return "\n## GGUF\n\n" + "".join(f"- {kind}: not written: {why}\n" for kind, why in refused.items())
    if not files:
        return ""
    rows = "\n".join(f"| `{f.name}` | {f.stem.rsplit('-', 1)[-1]} | {f.stat().st_size / 1e6:,.1f} MB |" for f in files)
    first = files[0].name
    return f"""
## GGUF

| file | type | size |
|---|---|---|
{rows}

Written in llama.cpp's conventions (architecture and tokenizer metadata, tensor names, chat template).
Run one with llama.cpp: `llama-cli -m {first} -cnv`; with Ollama: a `Modelfile` holding
`FROM ./{first}`, then `ollama create my-merge -f Modelfile && ollama run my-merge`; with
transformers: `AutoModelForCausalLM.from_pretrained(folder, gguf_file="{first}")`.
""" + "".join(f"\nNot written: {kind}: {why}\n" for kind, why in (refused or {}).items())


def _intermediate_type(checkpoint: Path) -> str:
    """llama-quantize's input: bf16 when the checkpoint is bf16 (f16 would clip its range), else f16."""
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    dtype = config.get("dtype") or config.get("torch_dtype")
    return "bf16" if dtype == "bfloat16" else "f16"


def quantize(source: Path, target: Path, kind: str) -> Path:
    """llama.cpp's own quantizer, for the types only it makes."""
    tool = shutil.which(QUANTIZE_TOOL)
    if tool is None:
        raise GGUFError(f"--gguf {kind}: {QUANTIZE_TOOL} is not on PATH")
    log.info("quantizing %s to %s with %s", source.name, kind.upper(), tool)
    result = subprocess.run([tool, str(source), str(target), kind.upper()], capture_output=True, text=True)
    if result.returncode != 0:
        tail = " ".join((result.stderr or result.stdout).split()[-30:])
        raise GGUFError(f"--gguf {kind}: {QUANTIZE_TOOL} failed (exit {result.returncode}): {tail}")
    return target


def write_gguf(checkpoint: Path, target: Path, kind: str, *, progress: bool = True) -> Path:
    """The checkpoint folder as one GGUF file of type `kind` (one of the gguf package's types),
    written to a scratch file that replaces `target` once complete."""
    import gguf
    from transformers import AutoConfig

    checkpoint = Path(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint)
    arch = check_config(config, checkpoint.name)
    qtype_name, file_type = _BASIC[kind]
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its INFO lines name our scratch files
    writer = gguf.GGUFWriter(path=None, arch=arch.gguf)
    _add_metadata(writer, config, arch, checkpoint.name, getattr(gguf.LlamaFileType, file_type))
    _add_vocabulary(writer, checkpoint, config)

    plan = list(_tensor_plan(checkpoint, config, arch, kind))
    for name, _source, shape, qtype, _transform in plan:
        byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype) if qtype not in _plain() else shape
        dtype = _plain().get(qtype, np.uint8)
        writer.add_tensor_info(name, byte_shape, np.dtype(dtype), int(np.prod(byte_shape)) * np.dtype(dtype).itemsize,
                               raw_dtype=None if qtype in _plain() else qtype)

    with atomic_file(target) as scratch:
        try:
            writer.write_header_to_file(scratch)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            bar = _progress(len(plan), f"GGUF {kind}", progress)
            for name, read, _shape, qtype, transform in plan:
                writer.write_tensor_data(_encode(transform(read()), qtype))
                bar.update(1)
            bar.close()
        finally:
            writer.close()
    log.info("wrote %s (%s, %.1f MB)", target.name, qtype_name, target.stat().st_size / 1e6)
    return target


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)


@functools.cache
def _plain() -> dict:
    """The ggml types written as plain numpy arrays; the others are encoded by gguf.quants."""
    import gguf

    return {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}


def _encode(array: np.ndarray, qtype) -> np.ndarray:
    import gguf

    if qtype in _plain():
        return np.ascontiguousarray(array.astype(_plain()[qtype]))
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def _add_metadata(writer, config, arch: _Arch, name: str, file_type) -> None:
    import gguf

    a = arch.gguf
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_uint32(f"{a}.block_count", config.num_hidden_layers)
    writer.add_uint32(f"{a}.context_length", config.max_position_embeddings)
    writer.add_uint32(f"{a}.embedding_length", config.hidden_size)
    writer.add_uint32(f"{a}.feed_forward_length", config.intermediate_size)
    writer.add_uint32(f"{a}.attention.head_count", config.num_attention_heads)
    writer.add_uint32(f"{a}.attention.head_count_kv",
                      getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_float32(f"{a}.rope.freq_base", _rope_theta(config))
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", float(config.rms_norm_eps))
    head_dim = _head_dim(config)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_uint32(f"{a}.attention.key_length", head_dim)
        writer.add_uint32(f"{a}.attention.value_length", head_dim)
    writer.add_file_type(file_type)
    writer.add_uint32(f"{a}.vocab_size", config.vocab_size)
    if arch.permute_qk:
        writer.add_uint32(f"{a}.rope.dimension_count", head_dim)
    scaling = _rope_scaling(config)
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_string(f"{a}.rope.scaling.type", "linear")
        writer.add_float32(f"{a}.rope.scaling.factor", float(scaling["factor"]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocabulary(writer, checkpoint: Path, config) -> None:
    """llama.cpp's `gpt2` vocabulary: every id's token text and type, the merges, the special ids,
    whether to add BOS, and the chat template."""
    import gguf
    from transformers import AutoTokenizer

    if not (checkpoint / "tokenizer.json").is_file():
        raise GGUFError(f"GGUF export of '{checkpoint.name}': no tokenizer.json (a fast byte-level BPE tokenizer is needed)")
    spec = json.loads((checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise GGUFError(f"GGUF export of '{checkpoint.name}': its tokenizer is not byte-level BPE (SentencePiece-style "
                        "tokenizers such as Llama 2's are not written by evomerge); convert the exported checkpoint "
                        "with llama.cpp's convert_hf_to_gguf.py")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    vocab = tokenizer.get_vocab()
    vocab_size = config.vocab_size
    if max(vocab.values()) >= vocab_size:
        raise GGUFError(f"GGUF export of '{checkpoint.name}': the tokenizer has ids beyond the model's vocab_size "
                        f"{vocab_size}")
    by_id = {index: text for text, index in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for index in range(vocab_size):
        text = by_id.get(index)
        if text is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif text in added:
            entry = decoder[index]
            if not entry.normalized:  # llama.cpp expects added tokens pre-normalized
                text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
            looks_special = text.startswith("<|") and text.endswith("|>")
            types.append(gguf.TokenType.CONTROL if entry.special or looks_special else gguf.TokenType.USER_DEFINED)
            tokens.append(text)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer, spec, checkpoint.name))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(checkpoint, load_merges=True, n_vocab=len(tokens))
    if special.chat_template is None and tokenizer.chat_template:
        special.chat_template = tokenizer.chat_template
    if "bos" not in special.add_special_token:  # say what the tokenizer does rather than leave llama.cpp to guess
        bos = tokenizer.bos_token_id
        special.add_special_token["bos"] = bos is not None and tokenizer.encode("a")[:1] == [bos]
    special.add_to_gguf(writer, quiet=True)


def _pre_tokenizer(tokenizer, spec: dict, model: str) -> str:
    digest = sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
    if digest in _PRE_TOKENIZERS:
        return _PRE_TOKENIZERS[digest]
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is None and all(pre.get(k) == v for k, v in _GPT2_PRE_TOKENIZER.items()):
        return "gpt-2"  # a plain byte-level BPE splits text with GPT-2's regex, whatever its vocabulary
    raise GGUFError(f"GGUF export of '{model}': llama.cpp would not know how to split text for this tokenizer "
                    f"(pre-tokenizer hash {digest[:16]}… is not one evomerge knows); convert the exported checkpoint "
                    "with llama.cpp's convert_hf_to_gguf.py")


def _tensor_plan(checkpoint: Path, config, arch: _Arch, kind: str):
    """(gguf name, reader, shape, ggml type, transform) for every tensor, in the checkpoint's order,
    then llama3's rope_freqs when the config asks for it."""
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf.upper()), config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    basic = getattr(gguf.GGMLQuantizationType, _BASIC[kind][0])
    tied = bool(getattr(config, "tie_word_embeddings", False))
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise GGUFError(f"GGUF export of '{checkpoint.name}': no safetensors weights in the checkpoint")
    for file in files:
        with safe_open(file, framework="pt") as handle:
            keys = list(handle.keys())
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in keys}
        for key in keys:
            if key == "lm_head.weight" and tied:
                continue
            if key.endswith("rotary_emb.inv_freq"):
                continue
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise GGUFError(f"GGUF export of '{checkpoint.name}': tensor '{key}' has no llama.cpp name "
                                f"for {arch.gguf}")
            shape = shapes[key]
            transform = _identity
            if arch.permute_qk and key.endswith(("q_proj.weight", "q_proj.bias")):
                transform = _permuter(heads)
            elif arch.permute_qk and key.endswith(("k_proj.weight", "k_proj.bias")):
                transform = _permuter(kv_heads)
            qtype = _choose_type(name, shape, kind, basic, tied)
            yield name, _reader(file, key), shape, qtype, transform
    scaling = _rope_scaling(config)
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        factors = _llama3_rope_factors(config, scaling)
        yield "rope_freqs.weight", lambda: factors, factors.shape, gguf.GGMLQuantizationType.F32, _identity


def _choose_type(name: str, shape: tuple[int, ...], kind: str, basic, tied: bool):
    """llama.cpp's converter rules: 1-D tensors and norms in F32; a row length the block does not
    divide falls back to F16; the low-bit types keep the output layer at Q8_0."""
    import gguf

    f32, f16, q8 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return f32
    chosen = basic
    if kind in _LOW_BIT and (name == "output.weight" or (tied and name == "token_embd.weight")):
        chosen = q8
    block, _ = gguf.GGML_QUANT_SIZES[chosen]
    if shape[-1] % block != 0:
        return f16
    return chosen


def _reader(file: Path, key: str):
    def read() -> np.ndarray:
        import torch
        from safetensors import safe_open

        with safe_open(file, framework="pt") as handle:
            return handle.get_tensor(key).to(torch.float32).numpy()

    return read


def _identity(array: np.ndarray) -> np.ndarray:
    return array


def _permuter(groups: int):
    """Hugging Face keeps each head's rotary halves apart ([x0..x(d/2-1) | x(d/2)..]); llama.cpp's
    Llama pairs them (x0, x(d/2), x1, ...): the rows of each of `groups` heads reordered."""

    def permute(array: np.ndarray) -> np.ndarray:
        rows = array.shape[0]
        return (array.reshape(groups, 2, rows // groups // 2, *array.shape[1:])
                .swapaxes(1, 2).reshape(array.shape))

    return permute


def _llama3_rope_factors(config, scaling: dict) -> np.ndarray:
    """Llama 3.1's frequency-dependent rope scaling, as the per-frequency factors llama.cpp reads
    from its rope_freqs tensor."""
    dim = _head_dim(config)
    freqs = 1.0 / (_rope_theta(config) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = float(scaling.get("factor", 8.0))
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)
