"""Every view of a run tokenized ONCE: id tensors with their lengths, shared by stage 0, the
selection, distillation, the dev checks and the evaluation, cached beside the run.

A corpus's views are tokenized in example-major order over a language list (view
``v = i * T + t`` is example i in language t), without padding, truncated to ``max_length``
exactly as a padded batch would be (truncation is per item). A batch is then a gather of
those ids padded to its longest view (:meth:`TokenizedViews.batch`): no tokenizer call, no
Python loop over tokens, and lengths are known before batching, so inference batches are
sorted by token count (``alsace_ds.data.batching.view_batches``).

Cache: ``<run_dir>/tokens/<name>.safetensors`` (flat ids, offsets; the fingerprint of views,
tokenizer and ``max_length`` in its metadata). A resumed run reuses it when the fingerprint
matches; anything else is tokenized again. Rank 0 builds and writes it (atomically), every
rank then reads the same file (:func:`task_tokens`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from alsace_ds.data.corpus import ParallelCorpus, View
from alsace_ds.io import atomic_write_bytes

CACHE_VERSION = "1"  # bump when the stored layout changes: old caches are rebuilt


# ----------------------------------------------------------------------------- tokenization


def _is_pair(view: object) -> bool:
    return isinstance(view, (tuple, list))


def tokenize_views(
    tokenizer: PreTrainedTokenizerBase, views: Sequence[View], max_length: int
) -> list[list[int]]:
    """Token ids of each view, unpadded, truncated to ``max_length`` (pairs:
    ``longest_first``, trimming the longer side token by token).

    Each view is a ``str`` or a 2-item ``(text_a, text_b)`` pair; all of one kind. A
    multi-field view (XCOPA's 4-tuple) must be rendered through a prompt first
    (:func:`alsace_ds.data.prompts.render_view`)."""
    if len(views) == 0:
        raise ValueError("no views to tokenize (an empty batch)")
    pair_flags = [_is_pair(v) for v in views]
    if any(pair_flags) and not all(pair_flags):
        raise ValueError("got a mix of single texts and sentence pairs in one corpus/batch")
    common = dict(max_length=max_length, padding=False, return_attention_mask=False)
    if all(pair_flags):
        for v in views:
            if len(v) != 2 or not all(isinstance(t, str) for t in v):
                raise ValueError(f"a pair view must be (text_a, text_b) strings, got {v!r}")
        a, b = [v[0] for v in views], [v[1] for v in views]
        enc = tokenizer(a, b, truncation="longest_first", **common)
    else:
        for v in views:
            if not isinstance(v, str):
                raise ValueError(f"a view must be a str or a (text_a, text_b) pair, got {v!r}")
        enc = tokenizer(list(views), truncation=True, **common)
    return [list(ids) for ids in enc["input_ids"]]


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no pad token; batches need one")
    return int(tokenizer.pad_token_id)


@dataclass(frozen=True)
class TokenizedViews:
    """V views as token ids: view v is ``flat[offsets[v] : offsets[v + 1]]``.

    ``flat`` ``[sum of lengths]`` int32 (half the memory of int64: XNLI's English training set
    is 20M tokens), ``offsets`` ``[V + 1]`` long, both on the host. Batches are padded with
    ``pad`` on ``side`` (the tokenizer's padding side) and come out long."""

    flat: Tensor
    offsets: Tensor
    pad: int
    side: str = "right"

    @classmethod
    def from_lists(cls, ids: Sequence[Sequence[int]], pad: int, side: str) -> TokenizedViews:
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)  # [V]
        offsets = torch.zeros(len(ids) + 1, dtype=torch.long)
        torch.cumsum(lengths, 0, out=offsets[1:])
        flat = torch.tensor([t for x in ids for t in x], dtype=torch.int32)
        return cls(flat, offsets, pad, side)

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    @property
    def lengths(self) -> Tensor:
        """``[V]`` token count of each view (special tokens included)."""
        return self.offsets[1:] - self.offsets[:-1]

    def batch(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """``(input_ids [B, L], attention_mask [B, L])`` of the views at ``indices``, padded
        to the longest of them: the tensors a padded tokenizer call would give."""
        idx = torch.as_tensor(indices, dtype=torch.long)  # [B]
        lengths = self.lengths[idx]  # [B]
        width = int(lengths.max())
        pos = torch.arange(width)  # [L]
        mask = pos[None, :] < lengths[:, None]  # [B, L] True on real tokens
        if self.side == "left":
            mask = mask.flip(1)
            pos = pos[None, :] - (width - lengths[:, None])  # [B, L] token position
        src = self.offsets[idx][:, None] + pos  # [B, L]
        ids = self.flat[src.clamp(0, self.flat.numel() - 1)].long().masked_fill(~mask, self.pad)
        return ids, mask.to(torch.long)

    def select(self, indices: Sequence[int] | Tensor) -> TokenizedViews:
        """The views at ``indices``, in that order (a copy)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.numel() == 0:
            raise ValueError("select() got no indices")
        lengths = self.lengths[idx]
        offsets = torch.zeros(idx.numel() + 1, dtype=torch.long)
        torch.cumsum(lengths, 0, out=offsets[1:])
        starts = torch.repeat_interleave(self.offsets[idx] - offsets[:-1], lengths)
        flat = self.flat[starts + torch.arange(int(offsets[-1]))]
        return TokenizedViews(flat, offsets, self.pad, self.side)

    def padding_fraction(self, batches: Sequence[Sequence[int]]) -> float:
        """Share of pad positions over all positions when run in ``batches`` of indices."""
        real = padded = 0
        for b in batches:
            lengths = self.lengths[torch.as_tensor(b, dtype=torch.long)]
            real += int(lengths.sum())
            padded += int(lengths.max()) * len(b)
        return 1.0 - real / padded if padded else 0.0


def encode_views(
    tokenizer: PreTrainedTokenizerBase, views: Sequence[View], max_length: int
) -> dict[str, Tensor]:
    """``input_ids`` / ``attention_mask`` [B, L] of a batch of views, padded to the longest
    (the reference path: the trainer batches pre-tokenized ids, :class:`TokenizedViews`)."""
    ids = tokenize_views(tokenizer, views, max_length)
    toks = TokenizedViews.from_lists(ids, pad_id(tokenizer), tokenizer.padding_side)
    input_ids, mask = toks.batch(range(len(ids)))
    return {"input_ids": input_ids, "attention_mask": mask}


# ----------------------------------------------------------------------------- corpora


@dataclass(frozen=True)
class TokenizedCorpus:
    """A corpus's views over ``languages``, example-major: ``index(i, lang) = i * T + t``."""

    name: str  # "train" | "unlabeled" | "dev" | "test"
    languages: tuple[str, ...]
    views: TokenizedViews

    @property
    def num_examples(self) -> int:
        return len(self.views) // len(self.languages)

    def index(self, example: int, lang: str) -> int:
        return example * len(self.languages) + self.languages.index(lang)

    def indices(self, examples: Sequence[int], langs: Sequence[str]) -> Tensor:
        """``[len(examples) * len(langs)]`` view indices, example-major."""
        ex = torch.as_tensor(examples, dtype=torch.long)[:, None]  # [B, 1]
        cols = torch.tensor([self.languages.index(x) for x in langs], dtype=torch.long)
        return (ex * len(self.languages) + cols[None, :]).flatten()


def corpus_views(corpus: ParallelCorpus, languages: Sequence[str]) -> list[View]:
    """Example-major flattening: view ``v`` is example ``v // T`` in language ``v % T``."""
    missing = [x for x in languages if x not in corpus.languages]
    if missing:
        raise ValueError(f"{corpus.path} has no views in {missing} (has {corpus.languages})")
    return [ex.views[lang] for ex in corpus.examples for lang in languages]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """What decides the ids: class, vocabulary, special tokens, truncation/padding sides."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    special = [tokenizer.all_special_tokens, tokenizer.all_special_ids, tokenizer.padding_side,
               tokenizer.truncation_side]  # fmt: skip
    h.update(json.dumps(special, ensure_ascii=False).encode())
    return h.hexdigest()


def _fingerprint(views: Sequence[View], tok_fp: str, max_length: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{tok_fp}|{max_length}|".encode())
    for v in views:
        h.update(json.dumps(v, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _cached(path: Path, fingerprint: str) -> TokenizedViews | None:
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("fingerprint") != fingerprint:
            return None
        t = load_file(str(path))
        toks = TokenizedViews(t["flat"], t["offsets"], int(meta["pad"]), meta["side"])
    except (OSError, ValueError, KeyError, SafetensorError):  # damaged: rebuilt, not trusted
        return None
    whole = int(toks.offsets[0]) == 0 and int(toks.offsets[-1]) == toks.flat.numel()
    return toks if whole and bool((toks.lengths > 0).all()) else None


def _write(path: Path, toks: TokenizedViews, fingerprint: str) -> None:
    meta = {"fingerprint": fingerprint, "pad": str(toks.pad), "side": toks.side}
    data = safetensors_bytes({"flat": toks.flat, "offsets": toks.offsets}, meta)
    atomic_write_bytes(path, data)


@dataclass(frozen=True)
class TaskTokens:
    """The run's tokenized corpora (None where the task has no such corpus) and the
    fingerprint of the tokenizer that made them."""

    tokenizer: str
    train: TokenizedCorpus | None
    unlabeled: TokenizedCorpus
    dev: TokenizedCorpus | None
    test: TokenizedCorpus

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase, source: str) -> None:
        """A stage's model must come with the tokenizer its views were tokenized by."""
        if tokenizer_fingerprint(tokenizer) != self.tokenizer:
            raise ValueError(
                f"the tokenizer of {source} differs from the one the run's views were "
                "tokenized with (stage 0's model); every stage of a run needs the same one"
            )


CorpusSpec = tuple[str, ParallelCorpus | None, Sequence[str]]
Check = Callable[[TokenizedCorpus, ParallelCorpus], None]


def tokenize_corpora(
    specs: Sequence[CorpusSpec],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    cache: Path | None,
    check: Check | None = None,
    write: bool = True,
    tok_fp: str | None = None,
) -> dict[str, TokenizedCorpus | None]:
    """Each ``(name, corpus, languages)`` read from ``cache/<name>.safetensors`` when its
    fingerprint matches, else tokenized (and written there when ``write``). ``check``
    validates each tokenized corpus (e.g. the cloze head's mask token). ``tok_fp``: the
    tokenizer's :func:`tokenizer_fingerprint` when the caller has it already."""
    tok_fp = tok_fp or tokenizer_fingerprint(tokenizer)
    out: dict[str, TokenizedCorpus | None] = {}
    for name, corpus, langs in specs:
        if corpus is None:
            out[name] = None
            continue
        views = corpus_views(corpus, langs)
        fp = _fingerprint(views, tok_fp, max_length)
        path = None if cache is None else cache / f"{name}.safetensors"
        toks = None if path is None else _cached(path, fp)
        if toks is None:
            ids = tokenize_views(tokenizer, views, max_length)
            toks = TokenizedViews.from_lists(ids, pad_id(tokenizer), tokenizer.padding_side)
            if path is not None and write:
                _write(path, toks, fp)
        out[name] = TokenizedCorpus(name, tuple(langs), toks)
        if check is not None:
            check(out[name], corpus)
    return out


def mask_count_problems(
    toks: TokenizedCorpus, corpus: ParallelCorpus, mask_token_id: int, limit: int = 10
) -> list[str]:
    """Views whose ids do not hold the mask token exactly once (a cloze input needs one),
    each named by file, example id and language; at most ``limit``, then a count."""
    v = toks.views
    is_mask = (v.flat == mask_token_id).to(torch.long)
    per_view = torch.zeros(len(v), dtype=torch.long).index_add_(
        0, torch.repeat_interleave(torch.arange(len(v)), v.lengths), is_mask
    )  # [V] mask tokens in each view
    bad = (per_view != 1).nonzero().flatten().tolist()
    T = len(toks.languages)
    lines = [
        f"{corpus.path}: example {corpus.examples[b // T].id!r}, language "
        f"{toks.languages[b % T]!r}: {int(per_view[b])} mask tokens"
        for b in bad[:limit]
    ]
    if len(bad) > limit:
        lines.append(f"(and {len(bad) - limit} more views)")
    return lines
