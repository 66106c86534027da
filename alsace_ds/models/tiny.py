"""Tiny offline stand-ins for XLM-R and mT5 (no network, no Hub).

Tests and smoke runs cannot download ``xlm-roberta-large`` or ``google/mt5-large``, so this
module builds a word-level tokenizer and a small randomly initialised model of the same
architecture and saves both with ``save_pretrained``. The resulting folder loads through the
same ``AutoTokenizer`` / ``AutoModel*.from_pretrained`` path as a real Hub checkpoint, so the
training code has only one loading path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing
from transformers import PretrainedConfig, PreTrainedTokenizerFast

from alsace_ds.models.families import FAMILIES

# Special tokens in id order. XLM-R uses the fairseq order <s>=0, <pad>=1, </s>=2, <unk>=3 and
# puts <mask> last in the real vocab; here it follows <unk> (id 4) so the ids stay small and
# deterministic. mT5 uses <pad>=0 (also the decoder start token), </s>=1, <unk>=2.
_SPECIALS = {
    "xlmr": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    "mt5": ["<pad>", "</s>", "<unk>"],
}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Splits on whitespace and isolates punctuation runs (regex \w+|[^\w\s]+).
    return pre_tokenizers.Whitespace()


def _vocab_pieces(words: Iterable[str]) -> list[str]:
    """Sorted unique pre-tokenized pieces of ``words``.

    Words are run through the same pre-tokenizer as the tokenizer, so an entry such as
    ``"don't"`` contributes the pieces ``don``, ``'``, ``t`` that the tokenizer will actually
    produce; otherwise it would end up in the vocab but never be matched.
    """
    pre = _pre_tokenizer()
    pieces: set[str] = set()
    for word in words:
        for piece, _span in pre.pre_tokenize_str(word):
            pieces.add(piece)
    return sorted(pieces)


def build_word_tokenizer(words: Iterable[str], family: str) -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer with XLM-R or mT5 special tokens and post-processing.

    xlmr: ``<s> A </s>`` and ``<s> A </s> </s> B </s>``; mt5: ``A </s>`` and ``A </s> B </s>``.
    Ids: the specials first (see ``_SPECIALS``), then the sorted unique word pieces.
    """
    _check_family(family)
    specials = _SPECIALS[family]
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(specials)}
    for piece in _vocab_pieces(words):
        if piece not in vocab:
            vocab[piece] = len(vocab)

    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = _pre_tokenizer()
    if family == "xlmr":
        tok.post_processor = TemplateProcessing(
            single="<s> $A </s>",
            pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            sep_token="</s>",
            cls_token="<s>",
            unk_token="<unk>",
            pad_token="<pad>",
            mask_token="<mask>",
            padding_side="right",
            model_input_names=["input_ids", "attention_mask"],
            clean_up_tokenization_spaces=False,
        )
    tok.post_processor = TemplateProcessing(
        single="$A </s>",
        pair="$A </s> $B </s>",
        special_tokens=[("</s>", vocab["</s>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )


def _untie_lm_head(model: torch.nn.Module, std: float) -> None:
    """Give the tiny mT5 its own output projection, like the real mT5 checkpoints.

    Real mT5 has ``lm_head`` separate from the ``shared`` input embeddings. transformers 5
    forces ``MT5Config.tie_word_embeddings = True`` and only unties at load time when a
    checkpoint holds both tensors with different values, so the untie is done on the module:
    a fresh ``lm_head.weight`` [V, d_model] (std d_model**-0.5 keeps initial logits O(1)) and
    the entry dropped from ``all_tied_weights_keys`` so ``save_pretrained`` writes both tensors.
    Loading then takes the same (untied) path as ``google/mt5-*``.
    """
    weight = torch.empty_like(model.shared.weight).normal_(mean=0.0, std=std)
    model.lm_head.weight = torch.nn.Parameter(weight)
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        tied.pop("lm_head.weight", None)


def _xlmr_config(
    tokenizer: PreTrainedTokenizerFast,
    labels: dict,
    hidden: int,
    layers: int,
    heads: int,
    ffn: int,
    max_length: int,
) -> PretrainedConfig:
    from transformers import XLMRobertaConfig

    pad = tokenizer.pad_token_id
    return XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        # RoBERTa position ids start at padding_idx + 1, so a sequence of max_length tokens
        # needs max_length + padding_idx + 1 positions; +2 more as slack (real XLM-R: 514).
        max_position_embeddings=max_length + pad + 3,
        type_vocab_size=1,
        pad_token_id=pad,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=len(labels["id2label"]),
        **labels,
    )


def _mt5_config(
    tokenizer: PreTrainedTokenizerFast, labels: dict, hidden: int, layers: int, heads: int, ffn: int
) -> PretrainedConfig:
    from transformers import MT5Config

    if hidden % heads:
        raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
    return MT5Config(
        vocab_size=len(tokenizer),
        d_model=hidden,
        d_kv=hidden // heads,
        d_ff=ffn,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **labels,
    )


def _build_model(
    family: str,
    tokenizer: PreTrainedTokenizerFast,
    label_names: Sequence[str],
    *,
    seed: int,
    hidden: int,
    layers: int,
    heads: int,
    ffn: int,
    max_length: int,
) -> torch.nn.Module:
    # Imported lazily: model classes are the heavy part of transformers.
    from transformers import MT5ForConditionalGeneration, XLMRobertaForSequenceClassification

    id2label = {i: str(name) for i, name in enumerate(label_names)}
    labels = {"id2label": id2label, "label2id": {name: i for i, name in id2label.items()}}
    if family == "xlmr":
        config = _xlmr_config(tokenizer, labels, hidden, layers, heads, ffn, max_length)
        model_cls = XLMRobertaForSequenceClassification
    else:
        config = _mt5_config(tokenizer, labels, hidden, layers, heads, ffn)
        model_cls = MT5ForConditionalGeneration
    # Seeded init inside a forked RNG so the caller's global torch RNG state is untouched and
    # the same seed gives bit-identical weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
        if family == "mt5":
            _untie_lm_head(model, std=hidden**-0.5)
    model.eval()
    return model


def build_tiny_model(
    out_dir: str | os.PathLike,
    family: str,
    words: Iterable[str],
    label_names: Sequence[str],
    *,
    label_words: Sequence[str] | None = None,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    ffn: int = 128,
    max_length: int = 64,
) -> Path:
    """Build and save a tiny random-init XLM-R classifier or mT5 seq2seq model plus tokenizer.

    For mt5, ``label_words`` (default: ``label_names``) are added to the vocabulary so each is
    a single token. The folder is written atomically: everything goes to a temporary sibling
    directory that is renamed to ``out_dir``; if ``out_dir`` already exists (e.g. another rank
    won the race) the temporary directory is removed and ``out_dir`` is returned unchanged.
    """
    _check_family(family)
    out_dir = Path(out_dir)
    if out_dir.exists():
        return out_dir
    if not label_names:
        raise ValueError("label_names must not be empty")
    words = list(words)
    if family == "mt5":
        label_words = list(label_names if label_words is None else label_words)
        if len(label_words) != len(label_names):
            raise ValueError(
                f"got {len(label_words)} label_words for {len(label_names)} label_names"
            )
        words += label_words

    tokenizer = build_word_tokenizer(words, family)
    model = _build_model(
        family,
        tokenizer,
        label_names,
        seed=seed,
        hidden=hidden,
        layers=layers,
        heads=heads,
        ffn=ffn,
        max_length=max_length,
    )
    tokenizer.model_max_length = max_length

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # Lost the race (rename onto a non-empty directory fails); keep the winner's copy.
            if not out_dir.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
