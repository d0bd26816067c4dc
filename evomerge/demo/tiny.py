"""A tiny random Llama family (base + fine-tunes) built in about a second, for tests.

The fine-tunes differ from the base in structured ways so merge methods disagree:
dense small changes in attention, sparse large changes in the MLP, and a low-rank change
everywhere. Fully determined by the seed.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = (
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? Answer: 48 / 2 = 24. 48 + 24 = 72. #### 72\n"
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * 2)\n"
    "The capital of France is Paris. A. true B. false C. maybe D. never Answer: A\n"
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } : , . ! ?\n"
)


def build_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(vocab_size: int, *, layers: int = 4, hidden: int = 64, tie_word_embeddings: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


FINETUNES = ("ft_math", "ft_code", "ft_knowledge")


def build_tiny_family(
    out_dir: str | Path, *, seed: int = 0, layers: int = 4, hidden: int = 64, tie_word_embeddings: bool = False
) -> dict[str, Path]:
    """Writes base/ and one folder per fine-tune; returns {name: path}."""
    tokenizer = build_tokenizer()
    config = tiny_config(len(tokenizer), layers=layers, hidden=hidden, tie_word_embeddings=tie_word_embeddings)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
    )
    return _write_family(config, tokenizer, Path(out_dir), FINETUNES, seed=seed, vary_norms=True)


def synthetic_finetune(state: dict[str, torch.Tensor], kind: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A fake fine-tune of `state`: kind 0 dense/attention, 1 sparse/MLP, 2 low-rank (mod 3)."""
    return {key: weight + _delta(kind % 3, key, weight, generator).to(weight.dtype) for key, weight in state.items()}


def _delta(index: int, key: str, weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    weight = weight.float()
    scale = weight.std().clamp(min=1e-3).item()
    if index == 0:  # dense, small, mostly attention
        strength = 0.10 if "self_attn" in key else 0.02
        return torch.randn(weight.shape, generator=generator) * scale * strength
    if index == 1:  # sparse, large, mostly MLP
        keep = torch.rand(weight.shape, generator=generator) < (0.15 if "mlp" in key else 0.03)
        return torch.randn(weight.shape, generator=generator) * scale * 0.5 * keep
    if weight.dim() == 2:  # low rank everywhere
        u = torch.randn(weight.shape[0], 2, generator=generator)
        v = torch.randn(2, weight.shape[1], generator=generator)
        return (u @ v) * scale * 0.05
    return torch.randn(weight.shape, generator=generator) * scale * 0.05


def with_added_tokens(source: str | Path, out_dir: str | Path, tokens: list[str], *, seed: int = 0,
                      special: bool = True) -> Path:
    """A copy of a tiny model whose tokenizer adds `tokens` (in that order; special tokens, as chat
    fine-tunes add them, unless `special` is False) and whose embedding and LM-head rows grow to
    match, the new rows random: a fine-tune with added tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    else:
        tokenizer.add_tokens(tokens)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            rows = module.weight[old:]
            rows.copy_(torch.randn(rows.shape, generator=generator) * module.weight[:old].std())
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_moe_family(out_dir: str | Path, *, model_type: str = "mixtral", seed: int = 0,
                          layers: int = 2, experts: int = 3) -> dict[str, Path]:
    """A tiny mixture-of-experts family (base + FINETUNES) of `model_type` ("mixtral", "qwen3_moe"),
    saved as transformers saves it: each expert a tensor of its own (Mixtral's
    `block_sparse_moe.experts.E.w1.weight`), as published checkpoints are."""
    from transformers import AutoConfig

    tokenizer = build_tokenizer()
    shape = tiny_config(len(tokenizer), layers=layers, hidden=32).to_dict()
    shape = {k: shape[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "max_position_embeddings")}
    moe = {"mixtral": {"num_local_experts": experts, "num_experts_per_tok": 2, "intermediate_size": 48},
           "qwen3_moe": {"num_experts": experts, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                         "intermediate_size": 48, "head_dim": 8}}[model_type]
    config = AutoConfig.for_model(model_type, **shape, **moe, tie_word_embeddings=False)
    return _write_family(config, tokenizer, Path(out_dir), FINETUNES, seed=seed, vary_norms=False)


def _write_family(config, tokenizer, out: Path, finetunes, *, seed: int, vary_norms: bool) -> dict[str, Path]:
    """A random base of `config` (its 1-D weights varied around their init when `vary_norms`: real
    checkpoints have non-constant norm weights) and one synthetic fine-tune per name, each saved
    with the tokenizer under `out`; returns {"base": path, name: path, ...}."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config).eval()
    if vary_norms:
        with torch.no_grad():
            for param in base.parameters():
                if param.dim() == 1:
                    param.mul_(1 + 0.1 * torch.randn(param.shape))
    paths = {"base": out / "base"}
    base.save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])
    generator = torch.Generator().manual_seed(seed + 1)
    state = base.state_dict()
    for index, name in enumerate(finetunes):
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(synthetic_finetune(state, index, generator))
        paths[name] = out / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def build_tiny_arch_family(out_dir: str | Path, model_type: str, layers: int, members: int, *, seed: int = 0,
                           tie_word_embeddings: bool = False, experts: int = 8) -> list[Path]:
    """A base and `members` fine-tunes of any causal-LM architecture transformers knows (`llama`,
    `mistral`, `qwen2`, `mixtral`, ...) with `layers` layers and tiny widths: a published recipe's
    layer ranges and architecture, at a size that merges in seconds. Returns [base, *fine-tunes]."""
    from transformers import AutoConfig

    tokenizer = build_tokenizer()
    shape = {"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": layers,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 256,
             "tie_word_embeddings": tie_word_embeddings}
    if model_type == "mixtral":
        shape.update(num_local_experts=experts, num_experts_per_tok=2)
    config = AutoConfig.for_model(model_type, **shape)
    paths = _write_family(config, tokenizer, Path(out_dir), [f"ft{i}" for i in range(members)], seed=seed,
                          vary_norms=True)
    return list(paths.values())
