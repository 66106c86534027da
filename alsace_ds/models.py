"""Model adapters: every backbone is seen by the trainer as ``(input_ids, attention_mask) ->
label logits [B, C]``.

- XLM-R (``xlmr``): a sequence-classification head over the C labels.
- mT5 (``mt5``): one label word per class, scored at the FIRST decoder step: a single
  teacher-forced decoder step from ``decoder_start_token_id`` and the vocabulary logits read at
  each label word's first token (METHOD.md, "How the model gives P(y | x)"). No generation.

``load_scorer`` is the single loading path for tiny local folders (``alsace_ds.tiny``) and real
Hub names (``xlm-roberta-large``, ``google/mt5-large``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

FAMILIES = ("xlmr", "mt5")

View = str | tuple[str, str] | list[str]


class LabelScorer(nn.Module):
    """Base adapter: ``forward(input_ids [B, L], attention_mask [B, L]) -> logits [B, C]``.

    ``hf_model`` is the wrapped transformers model (its parameters are the scorer's
    parameters, so DeepSpeed / optimizers see them through ``scorer.parameters()``).
    Logits are returned in float32 whatever the model dtype, so softmax / KL in the losses are
    computed in full precision.
    """

    family: str = ""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf_model = hf_model

    @property
    def num_labels(self) -> int:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def save_pretrained(self, out_dir: str | os.PathLike, **kwargs) -> None:
        """Save the HF model (config + weights) to ``out_dir``.

        Extra kwargs go to ``PreTrainedModel.save_pretrained`` (e.g. a ``state_dict`` gathered
        from ZeRO-3 partitions). Atomicity and rank selection are the caller's job.
        """
        self.hf_model.save_pretrained(out_dir, **kwargs)


class XLMRClassifier(LabelScorer):
    """XLM-R with a sequence-classification head (``num_labels = C``)."""

    family = "xlmr"

    @property
    def num_labels(self) -> int:
        return int(self.hf_model.config.num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # input_ids, attention_mask: [B, L] -> logits [B, C]
        out = self.hf_model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits.float()


class MT5LabelWords(LabelScorer):
    """mT5 scoring one label word per class at the first decoder step.

    ``label_token_ids`` [C] (long, non-persistent buffer: it is derived from the tokenizer and
    must not end up in checkpoints) holds the first token of each label word.
    """

    family = "mt5"

    def __init__(self, hf_model: nn.Module, label_token_ids: Sequence[int]) -> None:
        super().__init__(hf_model)
        if len(label_token_ids) == 0:
            raise ValueError("MT5LabelWords needs at least one label token id")
        if len(set(label_token_ids)) != len(label_token_ids):
            raise ValueError(f"label token ids must be distinct, got {list(label_token_ids)}")
        start = hf_model.config.decoder_start_token_id
        if start is None:
            raise ValueError("the mT5 config has no decoder_start_token_id")
        self.decoder_start_token_id = int(start)
        self.register_buffer(
            "label_token_ids",
            torch.tensor(list(label_token_ids), dtype=torch.long),
            persistent=False,
        )

    @property
    def num_labels(self) -> int:
        return int(self.label_token_ids.numel())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # input_ids, attention_mask: [B, L]
        batch = input_ids.shape[0]
        # One teacher-forced decoder step: decoder input is just the start token. [B, 1]
        decoder_input_ids = torch.full(
            (batch, 1), self.decoder_start_token_id, dtype=torch.long, device=input_ids.device
        )
        # The full forward (not a hand-picked slice of lm_head) keeps this correct under ZeRO-3,
        # where weights are only materialised inside their module's forward.
        out = self.hf_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            use_cache=False,
        )
        # out.logits: [B, 1, V] -> step 0 [B, V] -> label columns [B, C]
        return out.logits[:, 0, :].index_select(-1, self.label_token_ids).float()


def _piece(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    return str(tokenizer.convert_ids_to_tokens(int(token_id)))


def label_word_token_ids(
    tokenizer: PreTrainedTokenizerBase, words: Sequence[str]
) -> tuple[list[int], list[str]]:
    """Token id of each label word's first piece, plus warnings.

    The word is tokenized without special tokens. A SentencePiece tokenizer (real mT5) may emit
    a lone word-boundary piece ("▁") before the word; such blank pieces are skipped, since every
    label word would otherwise share that first token. Raises ValueError if a word maps to
    nothing, to the unknown token or another special token, or if two words share their first
    token (their classes would get identical logits).
    """
    ids: list[int] = []
    warnings: list[str] = []
    owner: dict[int, str] = {}
    special_ids = set(tokenizer.all_special_ids)
    for word in words:
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"label word {word!r} is empty or not a string")
        pieces = list(tokenizer(word, add_special_tokens=False)["input_ids"])
        # Drop leading pieces that decode to whitespace only (SentencePiece "▁").
        skipped = 0
        while skipped < len(pieces) - 1 and not tokenizer.decode([pieces[skipped]]).strip():
            skipped += 1
        usable = pieces[skipped:]
        if not usable or not tokenizer.decode([usable[0]]).strip():
            raise ValueError(f"label word {word!r} maps to no token")
        first = int(usable[0])
        if first == tokenizer.unk_token_id:
            raise ValueError(
                f"label word {word!r} maps to the unknown token {tokenizer.unk_token!r}; "
                "pick a word that is in the tokenizer's vocabulary"
            )
        if first in special_ids:
            raise ValueError(
                f"label word {word!r} maps to the special token {_piece(tokenizer, first)!r}"
            )
        if first in owner:
            raise ValueError(
                f"label words {owner[first]!r} and {word!r} share the first token "
                f"{_piece(tokenizer, first)!r} (id {first}); their classes would be "
                "indistinguishable"
            )
        owner[first] = word
        if len(pieces) > 1:
            note = f" (after skipping {skipped} blank piece(s))" if skipped else ""
            warnings.append(
                f"label word {word!r} is split into {len(pieces)} pieces; using the first "
                f"piece {_piece(tokenizer, first)!r}{note}"
            )
        ids.append(first)
    return ids, warnings


def load_scorer(
    family: str,
    name_or_path: str | os.PathLike,
    num_labels: int,
    *,
    label_words: Sequence[str] | None = None,
    dropout: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[LabelScorer, PreTrainedTokenizerBase, list[str]]:
    """Load tokenizer + model and wrap them as a ``LabelScorer``.

    Returns ``(scorer, tokenizer, warnings)``. Same path for local folders and Hub names; a
    local folder never touches the network. ``dropout`` overrides the config's dropout
    (xlmr: hidden + attention dropout; mt5: ``dropout_rate``). For xlmr, a checkpoint whose
    classification head has another size (or none, e.g. the MLM checkpoint) loads with a
    freshly initialised C-way head. The scorer is returned in eval mode.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    warnings: list[str] = []
    if family == "mt5":
        if label_words is None:
            raise ValueError("family 'mt5' needs label_words (one label word per class)")
        if len(label_words) != num_labels:
            raise ValueError(
                f"got {len(label_words)} label_words {list(label_words)} for "
                f"num_labels={num_labels}"
            )
    elif label_words is not None:
        warnings.append("label_words are ignored for family 'xlmr' (classification head)")

    name_or_path = os.fspath(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)

    overrides: dict = {}
    if dropout is not None:
        if family == "xlmr":
            overrides["hidden_dropout_prob"] = dropout
            overrides["attention_probs_dropout_prob"] = dropout
        else:
            overrides["dropout_rate"] = dropout
    config = AutoConfig.from_pretrained(name_or_path, **overrides)
    if family == "xlmr" and config.num_labels != num_labels:
        # The setter resets id2label/label2id to LABEL_i when the size changes (a checkpoint
        # whose id2label has the right size keeps its names).
        config.num_labels = num_labels

    if family == "xlmr":
        if config.model_type not in ("xlm-roberta", "xlm-roberta-xl", "roberta"):
            warnings.append(f"family 'xlmr' loading a {config.model_type!r} checkpoint")
        hf_model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, config=config, dtype=dtype, ignore_mismatched_sizes=True
        )
        scorer: LabelScorer = XLMRClassifier(hf_model)
    else:
        if not config.is_encoder_decoder:
            raise ValueError(
                f"family 'mt5' needs an encoder-decoder checkpoint; {name_or_path!r} is "
                f"{config.model_type!r}"
            )
        ids, word_warnings = label_word_token_ids(tokenizer, label_words)
        warnings.extend(word_warnings)
        hf_model = AutoModelForSeq2SeqLM.from_pretrained(name_or_path, config=config, dtype=dtype)
        scorer = MT5LabelWords(hf_model, ids)
    scorer.eval()
    return scorer, tokenizer, warnings


def _is_pair(view: object) -> bool:
    return isinstance(view, (tuple, list))


def encode_views(
    tokenizer: PreTrainedTokenizerBase, views: Sequence[View], max_length: int
) -> dict[str, torch.Tensor]:
    """Tokenize a batch of views into ``input_ids`` / ``attention_mask`` [B, L].

    Each view is a ``str`` or a 2-item ``(text_a, text_b)`` pair (e.g. premise / hypothesis);
    a batch must be all singles or all pairs. Padded to the longest item, truncated to
    ``max_length`` (pairs: ``longest_first``, trimming the longer side token by token).
    """
    if len(views) == 0:
        raise ValueError("encode_views got an empty batch")
    pair_flags = [_is_pair(v) for v in views]
    if any(pair_flags) and not all(pair_flags):
        raise ValueError("encode_views got a mix of single texts and sentence pairs in one batch")
    common = dict(
        padding="longest",
        max_length=max_length,
        return_tensors="pt",
        return_attention_mask=True,
    )
    if all(pair_flags):
        for v in views:
            if len(v) != 2 or not all(isinstance(t, str) for t in v):
                raise ValueError(f"a pair view must be (text_a, text_b) strings, got {v!r}")
        enc = tokenizer(
            [v[0] for v in views], [v[1] for v in views], truncation="longest_first", **common
        )
    else:
        for v in views:
            if not isinstance(v, str):
                raise ValueError(f"a view must be a str or a (text_a, text_b) pair, got {v!r}")
        enc = tokenizer(list(views), truncation=True, **common)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
