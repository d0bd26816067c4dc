"""The output vocabulary: mergekit 0.1.5's `tokenizer_source` / `tokenizer:` settings.

When a recipe names a tokenizer setting, the merged model speaks one output vocabulary: a
model's tokenizer, the base's, or the union of every source's (the base's tokens first, then
each other model's tokens it lacks, then the added tokens), plus the tokens the `tokens:` block
names. Every vocabulary tensor (input embeddings, LM head) of every source is mapped onto it row
by row, by token text:

- a token a source has keeps that source's own row (unless the setting forces another);
- a token a source lacks gets a default row: the `tokens:` block's choice when it names one;
  else the row of the only model that has it; else the base's row when the base has it; else the
  average of the models that have it; zeros when none has it;
- `pad_to_multiple_of` rounds the row count up; the padding rows are the mean of the others.

The defaults depend on which models a tensor merges, so the mapping is computed per (tensor,
models) pair, once, and kept: a search over such a family pays for it on its first candidate only.
The arithmetic (sums in model order, division, mean) runs in the sources' dtype as mergekit's does,
so the mapped rows are mergekit's bit for bit.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.checkpoint import SourceModel, locate
from evomerge.errors import CheckpointError, RecipeError
from evomerge.recipe import ModelToken, TokenizerSetting, TokenSetting, ZeroToken

log = logging.getLogger(__name__)


@dataclass
class Vocabulary:
    """The output tokenizer and, per source, where each output token's row is in that source."""

    setting: TokenizerSetting
    tokenizer: Any  # a transformers tokenizer (the checkpoint's, and the evaluation's)
    ids: dict[str, int]  # output token -> output id
    size: int  # rows of every output vocabulary tensor (len(ids), padded)
    index: dict[str, torch.Tensor]  # model -> per output id, that model's row or -1
    original: dict[str, dict[str, int]]  # model -> its own tokenizer's vocabulary

    def describe(self) -> str:
        return (f"{self.setting.source} tokenizer: {len(self.ids)} tokens, {self.size} rows"
                + "".join(f"; '{m}' lacks {int((i < 0).sum())}" for m, i in self.index.items() if (i < 0).any()))

    # ------------------------------------------------------------------ mapping rows

    def map(self, name: str, tensors: dict[str, torch.Tensor], base: str | None) -> list[torch.Tensor]:
        """Each model's vocabulary tensor (rows = its tokens) mapped onto the output vocabulary, in
        the order of `tensors` (the order the tensor's merge lists its models); `base`: the recipe's
        base model here, whose rows fill the tokens other models lack."""
        models = list(tensors)  # the engine holds them in one dtype, each with the output's row shape
        first = tensors[models[0]]
        dtype, device, shape, count = first.dtype, first.device, first.shape[1:], len(self.ids)
        present = torch.stack([self.index[m] >= 0 for m in models])  # [models, tokens], on the CPU
        settings = {t: s for t, s in (self.setting.tokens or {}).items() if s.source is not None}
        averaged = self._assign(models, present, settings, base)

        defaults: dict[int, torch.Tensor] = {}  # output id -> the row that models lacking it (or forced) get
        forced = torch.zeros(count, dtype=torch.bool)
        lacking = ~present.all(dim=0)
        for token, setting in settings.items():
            token_id = self.ids[token]
            forced[token_id] = setting.force
            if lacking[token_id] or setting.force:
                defaults[token_id] = self._default(name, token, token_id, setting, tensors)
        if averaged:
            ids = torch.tensor(sorted(averaged))
            total = torch.zeros((len(ids), *shape), dtype=dtype, device=device)
            for m, model in enumerate(models):  # summed in model order, as mergekit sums
                has = present[m, ids]
                rows = self.index[model][ids[has]].to(device)
                has = has.to(device)
                total[has] = total[has] + tensors[model][rows]
            have = present[:, ids].sum(dim=0).to(device)
            for n in have.unique().tolist():  # divided by a Python int, as mergekit's `embed /= count`
                group = have == n
                total[group] /= n
            defaults.update({int(i): total[k] for k, i in enumerate(ids)})

        default_ids = torch.tensor(sorted(defaults), dtype=torch.long)
        default_rows = torch.stack([defaults[int(i)] for i in default_ids]) if len(default_ids) else None
        out = []
        for m, model in enumerate(models):
            own = present[m] & ~forced
            mapped = torch.zeros((self.size, *shape), dtype=dtype, device=device)
            ids = own.nonzero().squeeze(1)
            mapped[ids.to(device)] = tensors[model][self.index[model][ids].to(device)]
            unfilled = ~own
            if default_rows is not None:
                take = unfilled[default_ids]
                mapped[default_ids[take].to(device)] = default_rows[take.to(device)]
                unfilled[default_ids] = False
            if unfilled.any():
                token = next(t for t, i in self.ids.items() if unfilled[i])
                log.error("no embedding for token %r in model '%s' (zeros, as mergekit)", token, model)
            if self.size > count:  # padding rows: the mean of the real ones
                mapped[count:] = torch.mean(mapped[:count], dim=0)
            out.append(mapped)
        return out

    def _assign(self, models: list[str], present: torch.Tensor, settings: dict[str, TokenSetting],
                base_model: str | None) -> set[int]:
        """Fills `settings` with the default source of every token some model lacks (mergekit's rules);
        returns the ids whose default is the average of the models that have them."""
        averaged = set()
        have = present.sum(dim=0)
        base = models.index(base_model) if base_model in models else None
        for token, token_id in self.ids.items():
            if token in settings:
                continue
            n = int(have[token_id])
            if n == len(models):
                continue  # every model keeps its own row
            if n == 1:
                settings[token] = TokenSetting(source=models[int(present[:, token_id].nonzero()[0])])
            elif n == 0:
                settings[token] = TokenSetting(source=ZeroToken(kind="zero"))
                log.warning("token %r is in none of the models: its rows are zeros", token)
            elif base is not None and present[base, token_id]:
                settings[token] = TokenSetting(source=base_model)
            else:
                averaged.add(token_id)
        return averaged

    def _default(self, name, token, token_id, setting: TokenSetting, tensors) -> torch.Tensor:
        source = setting.source
        if isinstance(source, ZeroToken):
            first = next(iter(tensors.values()))
            return first.new_zeros(first.shape[1:])
        model = source.model if isinstance(source, ModelToken) else source
        if model not in tensors:
            raise RecipeError(f"tokenizer.tokens.{token}: takes its row from model '{model}', which tensor "
                              f"'{name}' does not merge")
        if isinstance(source, ModelToken):  # its token or token_id checked against the model by _check_tokens
            row = source.token_id if source.token_id is not None else self.original[model][source.token]
            return tensors[model][row]
        row = int(self.index[model][token_id])
        if row < 0:
            raise RecipeError(f"tokenizer.tokens.{token}: model '{model}' has no token {token!r}")
        return tensors[model][row]


# ---------------------------------------------------------------------- building


def build_vocabulary(setting: TokenizerSetting, sources: dict[str, SourceModel], base: str) -> Vocabulary:
    """The output tokenizer and every source's row index, from the tokenizers alone (no weights)."""
    tokenizers = {base: _base_tokenizer(sources[base])}
    for ref, source in sources.items():
        if ref == base:
            continue
        try:
            tokenizers[ref] = source.tokenizer()
        except CheckpointError as exc:
            log.warning("%s; taking its vocabulary to be the base model's, as mergekit does", exc)
    if setting.source == "base":
        out = tokenizers[base]
    elif setting.source == "union":
        out = _union(tokenizers, sources, base)
    elif setting.source in sources:
        out = sources[setting.source].tokenizer()
    else:
        out = locate(setting.source).tokenizer()  # a model outside the recipe lends its tokenizer
    for ref in sources:  # as mergekit assumes, a model whose tokenizer does not load has the base's
        tokenizers.setdefault(ref, tokenizers[base])
    vocabs = {ref: tokenizer.get_vocab() for ref, tokenizer in tokenizers.items()}
    _check_tokens(setting, sources, vocabs)
    present = set(out.get_vocab())
    for token in setting.tokens or {}:
        if token not in present:
            out.add_tokens(token)
            present.add(token)
    ids = out.get_vocab()
    for ref, tokenizer in tokenizers.items():  # `source: base`: the base's tokenizer is the output's, tokens added
        if tokenizer is out:
            vocabs[ref] = ids
    if sorted(ids.values()) != list(range(len(ids))):
        raise RecipeError(f"tokenizer: the output tokenizer ({setting.source}) has gaps in its token ids")
    size = len(ids)
    if setting.pad_to_multiple_of and size % setting.pad_to_multiple_of:
        size += setting.pad_to_multiple_of - size % setting.pad_to_multiple_of
    index = {}
    for ref, source in sources.items():
        own, rows = vocabs[ref], source.vocab_size
        column = torch.full((len(ids),), -1, dtype=torch.long)
        for token, token_id in ids.items():
            row = own.get(token)
            if row is not None and row < rows:  # ids past the model's rows: a padding id, not a row
                column[token_id] = row
        index[ref] = column
    vocabulary = Vocabulary(setting, out, ids, size, index, vocabs)
    log.info("output vocabulary: %s", vocabulary.describe())
    return vocabulary


def _check_tokens(setting: TokenizerSetting, sources: dict[str, SourceModel], vocabs: dict[str, dict[str, int]]) -> None:
    """The `tokens:` block names models of the recipe and tokens they have (checked before loading)."""
    for token, entry in (setting.tokens or {}).items():
        source = entry.source
        model = source.model if isinstance(source, ModelToken) else source if isinstance(source, str) else None
        if model is None:
            continue
        if model not in sources:
            raise RecipeError(f"tokenizer.tokens.{token}: takes its row from model '{model}', which is not one of "
                              "the recipe's models")
        if isinstance(source, ModelToken):
            if source.token is not None and source.token not in vocabs[model]:
                raise RecipeError(f"tokenizer.tokens.{token}: model '{model}' has no token {source.token!r}")
            if source.token_id is not None and source.token_id >= sources[model].vocab_size:
                raise RecipeError(f"tokenizer.tokens.{token}: token_id {source.token_id} is past model '{model}''s "
                                  f"{sources[model].vocab_size} rows")


def _base_tokenizer(source: SourceModel):
    """The base's tokenizer, which must not name rows the model does not have (mergekit strips such
    tokens from BPE tokenizers; evomerge asks for a tokenizer that fits the model instead)."""
    tokenizer = source.tokenizer()
    rows = source.vocab_size
    beyond = sorted(i for i in tokenizer.get_vocab().values() if i >= rows)
    if beyond:
        raise CheckpointError(f"model '{source.ref}': its tokenizer has {len(beyond)} token(s) with ids from {beyond[0]} "
                              f"up, past its vocab_size {rows}; give it a tokenizer that fits its embedding rows")
    return tokenizer


def _union(tokenizers: dict[str, Any], sources: dict[str, SourceModel], base: str):
    """The base tokenizer, then each other model's regular tokens the base lacks (as added tokens),
    then every model's added tokens (first settings win), in model order and id order."""
    from transformers import AutoTokenizer

    regular: dict[str, None] = {}
    added: dict[str, Any] = {}
    for ref, tokenizer in tokenizers.items():
        rows = sources[ref].vocab_size
        decoder = {i: info for i, info in tokenizer.added_tokens_decoder.items() if i < rows}
        special = {info.content for info in decoder.values()}
        for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if token_id < rows and token not in special:
                regular.setdefault(token, None)
        for token_id, info in sorted(decoder.items()):
            if info.content in added and added[info.content] != info:
                log.warning("token %r is added with different settings by several models; the first's kept",
                            info.content)
            added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as scratch:  # a fresh copy: the base's tokenizer stays as it is
        tokenizers[base].save_pretrained(scratch)
        union = AutoTokenizer.from_pretrained(scratch)
    known = tokenizers[base].get_vocab()
    for token in regular:
        if token not in added and token not in known:
            union.add_tokens(token)
    for info in added.values():
        union.add_tokens(info)
    return union
