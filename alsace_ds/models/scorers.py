"""Model adapters: every backbone is seen by the trainer as
``(input_ids [B, L], attention_mask [B, L], lang_ids [B] | None) -> label logits [B, C]``.

Heads (METHOD.md, "How the model gives P(y | x)"):

- XLM-R ``classification`` (:class:`XLMRClassifier`): a sequence-classification head over the
  C labels. ``lang_ids`` is accepted and ignored.
- XLM-R ``cloze`` (:class:`XLMRCloze`): a masked-LM; the (templated) input holds the mask token
  exactly once and the vocabulary logits at that position are read at each label's verbalizer
  token.
- mT5 ``label_words`` (:class:`MT5LabelWords`): one label word per class, scored at the FIRST
  decoder step: a single teacher-forced decoder step from ``decoder_start_token_id`` and the
  vocabulary logits read at each label word's first token. No generation.

Scorers that read label words hold a table ``label_token_ids`` ``[T, C]`` (one row per
language, in the task's language order; a single row is shared by every language) and
``lang_ids`` picks each input's row.

``load_scorer`` is the single loading path for tiny local folders (``alsace_ds.models.tiny``) and
real Hub names (``xlm-roberta-large``, ``google/mt5-large``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from alsace_ds.models.families import FAMILIES, HEADS

LabelIds = Sequence[int] | Sequence[Sequence[int]] | torch.Tensor


class LabelScorer(nn.Module):
    """Base adapter: ``forward(input_ids [B, L], attention_mask [B, L], lang_ids [B] | None)
    -> logits [B, C]``.

    ``hf_model`` is the wrapped transformers model (its parameters are the scorer's
    parameters, so DeepSpeed / optimizers see them through ``scorer.parameters()``).
    Logits are returned in float32 whatever the model dtype, so softmax / KL in the losses are
    computed in full precision. A scorer is saved as the plain Hugging Face folder of
    ``hf_model`` (``engine.trainer.export_hf``); label-word tables are derived from the
    tokenizer and the verbalizers at load time, never saved.
    """

    family: str = ""
    head: str = ""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf_model = hf_model

    @property
    def num_labels(self) -> int:
        raise NotImplementedError

    @property
    def per_language(self) -> bool:
        """True when ``forward`` needs ``lang_ids`` (a label-word table with several rows)."""
        return False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        lang_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError


class XLMRClassifier(LabelScorer):
    """XLM-R with a sequence-classification head (``num_labels = C``)."""

    family = "xlmr"
    head = "classification"

    @property
    def num_labels(self) -> int:
        return int(self.hf_model.config.num_labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        lang_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # input_ids, attention_mask: [B, L] -> logits [B, C]; lang_ids is not used.
        out = self.hf_model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits.float()


def label_table(label_token_ids: LabelIds) -> torch.Tensor:
    """``[T, C]`` long tensor from a flat list of C ids (-> one shared row ``[1, C]``), a list
    of T lists of C ids, or a 1-D / 2-D tensor. Ids within a row must be distinct."""
    if isinstance(label_token_ids, torch.Tensor):
        table = label_token_ids.detach().to(device="cpu", dtype=torch.long)
    else:
        rows = list(label_token_ids)
        if rows and all(isinstance(r, (Sequence, torch.Tensor)) for r in rows):
            rows = [[int(x) for x in r] for r in rows]
            if len({len(r) for r in rows}) != 1:
                raise ValueError(
                    f"every row of the label token table needs the same number of labels, "
                    f"got row lengths {[len(r) for r in rows]}"
                )
            table = torch.tensor(rows, dtype=torch.long)
        else:
            table = torch.tensor([int(x) for x in rows], dtype=torch.long)
    if table.dim() == 1:
        table = table.unsqueeze(0)
    if table.dim() != 2 or table.numel() == 0:
        raise ValueError(
            f"label token ids must be C ids or a [T, C] table with C >= 1, got shape "
            f"{tuple(table.shape)}"
        )
    for t, row in enumerate(table.tolist()):
        if len(set(row)) != len(row):
            where = "" if table.shape[0] == 1 else f" (row {t})"
            raise ValueError(f"label token ids must be distinct{where}, got {row}")
    return table


class LabelWordScorer(LabelScorer):
    """A scorer that reads vocabulary logits at label tokens.

    ``label_token_ids`` ``[T, C]`` (long, non-persistent buffer: it is derived from the
    tokenizer and must not end up in checkpoints): row t holds the first token of each label's
    word in language t. A single row is shared by every language.
    """

    def __init__(self, hf_model: nn.Module, label_token_ids: LabelIds) -> None:
        super().__init__(hf_model)
        self.register_buffer("label_token_ids", label_table(label_token_ids), persistent=False)

    @property
    def num_labels(self) -> int:
        return int(self.label_token_ids.shape[1])

    @property
    def num_label_rows(self) -> int:
        return int(self.label_token_ids.shape[0])

    @property
    def per_language(self) -> bool:
        return self.num_label_rows > 1

    def label_rows(self, lang_ids: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Each input's row of the table: ``[B, C]`` long on the table's device."""
        table = self.label_token_ids  # [T, C]
        rows = table.shape[0]
        if lang_ids is not None:
            if not isinstance(lang_ids, torch.Tensor):
                lang_ids = torch.as_tensor(lang_ids)
            if lang_ids.dim() != 1 or lang_ids.shape[0] != batch:
                raise ValueError(
                    f"lang_ids must have shape [B] = [{batch}], got {tuple(lang_ids.shape)}"
                )
            if lang_ids.dtype.is_floating_point or lang_ids.dtype == torch.bool:
                raise ValueError(f"lang_ids must be an integer tensor, got {lang_ids.dtype}")
        if rows == 1:  # shared by every language: any lang id maps to row 0
            return table.expand(batch, -1)
        if lang_ids is None:
            raise ValueError(
                f"this scorer has per-language label words ({rows} rows); forward needs "
                "lang_ids [B] (each input's row, i.e. its language index)"
            )
        if lang_ids.device.type == "cpu":  # on an accelerator, reading it would stall the
            lo, hi = int(lang_ids.min()), int(lang_ids.max())  # host: the trainer's ids
            if lo < 0 or hi >= rows:  # come from the task's language list (always in range)
                raise ValueError(f"lang_ids must lie in [0, {rows}), got values in [{lo}, {hi}]")
        return table.index_select(0, lang_ids.to(device=table.device, dtype=torch.long))


class XLMRCloze(LabelWordScorer):
    """XLM-R masked-LM read at the mask token: a cloze prompt with a verbalizer per label.

    Each input holds the tokenizer's mask token exactly once. The encoder
    (``hf_model.base_model``) gives hidden states ``[B, L, H]``; only the mask position of
    each row ``[B, H]`` goes through the MLM head (``hf_model.lm_head``, called through its
    forward so ZeRO-3 gathers its parameters) -> ``[B, V]`` -> label columns ``[B, C]``. The
    ``[B, L, V]`` logits of a full MaskedLM forward (V = 250k for XLM-R) are never built.
    """

    family = "xlmr"
    head = "cloze"

    def __init__(self, hf_model: nn.Module, label_token_ids: LabelIds, mask_token_id: int) -> None:
        super().__init__(hf_model, label_token_ids)
        if mask_token_id is None:
            raise ValueError("XLMRCloze needs the tokenizer's mask token id")
        self.mask_token_id = int(mask_token_id)
        if self._mlm_head() is None:
            raise ValueError(
                f"{type(hf_model).__name__} has no masked-LM head module (lm_head / cls)"
            )

    def _mlm_head(self) -> nn.Module | None:
        for name in ("lm_head", "cls"):  # RoBERTa / XLM-R: lm_head; BERT-style: cls
            module = getattr(self.hf_model, name, None)
            if isinstance(module, nn.Module):
                return module
        return None

    def mask_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B]`` position of the mask token in each row; ValueError unless exactly one.

        The check reads the counts on the host, so it runs on host tensors only: on an
        accelerator it would stall every forward. The trainer's inputs were checked once,
        when the run's views were tokenized (:func:`alsace_ds.data.tokens.mask_count_problems`).
        """
        is_mask = input_ids == self.mask_token_id  # [B, L]
        if input_ids.device.type != "cpu":
            return is_mask.to(torch.long).argmax(dim=1)
        counts = is_mask.sum(dim=1)  # [B]
        bad = (counts != 1).nonzero().flatten().tolist()
        if bad:
            found = counts[bad].tolist()
            shown = ", ".join(f"row {r}: {n}" for r, n in zip(bad[:10], found[:10], strict=True))
            more = f" (and {len(bad) - 10} more rows)" if len(bad) > 10 else ""
            raise ValueError(
                f"a cloze input must contain the mask token (id {self.mask_token_id}) exactly "
                f"once; mask tokens found: {shown}{more}. No mask: it was truncated away "
                "(raise max_length or put the mask where truncation cannot reach it) or the "
                "views were not rendered through a cloze template; several: the text itself "
                "contains the mask token"
            )
        return is_mask.to(torch.long).argmax(dim=1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        lang_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # input_ids, attention_mask: [B, L]; lang_ids: [B] or None
        batch = input_ids.shape[0]
        rows = self.label_rows(lang_ids, batch)  # [B, C]
        positions = self.mask_positions(input_ids)  # [B]
        out = self.hf_model.base_model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out[0]  # [B, L, H]
        arange = torch.arange(batch, device=hidden.device)
        at_mask = hidden[arange, positions.to(hidden.device)]  # [B, H]
        vocab = self._mlm_head()(at_mask)  # [B, V]
        return vocab.gather(1, rows.to(vocab.device)).float()  # [B, C]


class MT5LabelWords(LabelWordScorer):
    """mT5 scoring one label word per class at the first decoder step.

    ``label_token_ids`` ``[T, C]`` holds the first token of each label word, one row per
    language (a flat list of C ids gives one row shared by every language).
    """

    family = "mt5"
    head = "label_words"

    def __init__(self, hf_model: nn.Module, label_token_ids: LabelIds) -> None:
        if not isinstance(label_token_ids, torch.Tensor) and len(label_token_ids) == 0:
            raise ValueError("MT5LabelWords needs at least one label token id")
        super().__init__(hf_model, label_token_ids)
        start = hf_model.config.decoder_start_token_id
        if start is None:
            raise ValueError("the mT5 config has no decoder_start_token_id")
        self.decoder_start_token_id = int(start)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        lang_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # input_ids, attention_mask: [B, L]; lang_ids: [B] or None
        batch = input_ids.shape[0]
        rows = self.label_rows(lang_ids, batch)  # [B, C]
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
        # out.logits: [B, 1, V] -> step 0 [B, V] -> each row's label columns [B, C]
        step0 = out.logits[:, 0, :]
        return step0.gather(1, rows.to(step0.device)).float()


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


def _where(t: int, languages: Sequence[str] | None) -> str:
    if languages is not None and t < len(languages):
        return f"language {languages[t]!r} (row {t})"
    return f"language row {t}"


def _label_word_rows(
    label_words: Sequence[str] | Sequence[Sequence[str]],
    num_labels: int,
    languages: Sequence[str] | None,
) -> tuple[list[list[str]], bool]:
    """``(rows, per_language)``: one shared row of C words, or T rows (one per language)."""
    if isinstance(label_words, str):
        raise ValueError(f"label_words must be a list of words, not the string {label_words!r}")
    items = list(label_words)
    if not items:
        raise ValueError("label_words is empty")
    if all(isinstance(w, str) for w in items):
        if len(items) != num_labels:
            raise ValueError(f"got {len(items)} label_words {items} for num_labels={num_labels}")
        return [items], False
    if not all(isinstance(w, Sequence) and not isinstance(w, str) for w in items):
        raise ValueError(
            "label_words must be a list of C words (shared by every language) or a list of T "
            f"lists of C words (one per language), got {items!r}"
        )
    rows = [list(r) for r in items]
    if languages is not None and len(rows) != len(languages):
        raise ValueError(
            f"got {len(rows)} rows of label_words for {len(languages)} languages "
            f"{list(languages)}; per-language label words need one row per language"
        )
    for t, row in enumerate(rows):
        if len(row) != num_labels:
            raise ValueError(
                f"label_words for {_where(t, languages)}: got {len(row)} words {row} for "
                f"num_labels={num_labels}"
            )
    return rows, True


def label_word_table(
    tokenizer: PreTrainedTokenizerBase,
    label_words: Sequence[str] | Sequence[Sequence[str]],
    num_labels: int,
    languages: Sequence[str] | None = None,
) -> tuple[list[list[int]], list[str]]:
    """``([T, C] token ids, warnings)`` for shared (T = 1) or per-language label words.

    Each row goes through :func:`label_word_token_ids` (first piece of a split word, with a
    warning; unknown / special / within-row shared first tokens are errors). Errors and
    warnings of per-language rows name the language (its code when ``languages`` is given).
    The same token in two languages' rows is fine.
    """
    rows, per_language = _label_word_rows(label_words, num_labels, languages)
    table: list[list[int]] = []
    warnings: list[str] = []
    for t, row in enumerate(rows):
        try:
            ids, row_warnings = label_word_token_ids(tokenizer, row)
        except ValueError as exc:
            if not per_language:
                raise
            raise ValueError(f"label_words for {_where(t, languages)}: {exc}") from exc
        table.append(ids)
        prefix = f"{_where(t, languages)}: " if per_language else ""
        warnings.extend(prefix + w for w in row_warnings)
    return table, warnings


def resolve_head(family: str, head: str | None) -> str:
    """The head name (``None`` = the family's default); ValueError listing the valid heads."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    if head is None:
        return HEADS[family][0]
    if head not in HEADS[family]:
        valid = "; ".join(
            f"{fam}: {', '.join(h + (' (default)' if i == 0 else '') for i, h in enumerate(hs))}"
            for fam, hs in HEADS.items()
        )
        raise ValueError(f"unknown head {head!r} for model family {family!r}; valid heads: {valid}")
    return head


def _check_scorer_args(
    family: str,
    head: str | None,
    num_labels: int,
    dropout: float | None,
    label_words: Sequence[str] | Sequence[Sequence[str]] | None,
    languages: Sequence[str] | None,
) -> tuple[str, list[str]]:
    """(head, warnings); every argument error is raised here, before anything is loaded."""
    head = resolve_head(family, head)
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if head not in ("cloze", "label_words"):
        if label_words is None:
            return head, []
        return head, [f"label_words are ignored for family {family!r} ({head} head)"]
    if label_words is None:
        raise ValueError(
            f"family {family!r} with head {head!r} needs label_words (one label word per "
            "class, shared or per language)"
        )
    _label_word_rows(label_words, num_labels, languages)  # shape errors before any loading
    return head, []


def _load_config(name_or_path: str, family: str, dropout: float | None) -> AutoConfig:
    """The checkpoint's config with the dropout override (xlmr: hidden + attention; mt5:
    ``dropout_rate``)."""
    overrides: dict = {}
    if dropout is not None:
        if family == "xlmr":
            overrides["hidden_dropout_prob"] = dropout
            overrides["attention_probs_dropout_prob"] = dropout
        else:
            overrides["dropout_rate"] = dropout
    return AutoConfig.from_pretrained(name_or_path, **overrides)


def _xlmr_classifier(
    name_or_path: str, config: AutoConfig, num_labels: int, dtype: torch.dtype
) -> XLMRClassifier:
    if config.num_labels != num_labels:
        # The setter resets id2label/label2id to LABEL_i when the size changes (a
        # checkpoint whose id2label has the right size keeps its names).
        config.num_labels = num_labels
    hf_model = AutoModelForSequenceClassification.from_pretrained(
        name_or_path, config=config, dtype=dtype, ignore_mismatched_sizes=True
    )
    return XLMRClassifier(hf_model)


def _xlmr_cloze(
    name_or_path: str,
    config: AutoConfig,
    tokenizer: PreTrainedTokenizerBase,
    table: list[list[int]],
    dtype: torch.dtype,
    warnings: list[str],
) -> XLMRCloze:
    """The MLM checkpoint read at the mask; warns when its MLM head is freshly initialised."""
    if tokenizer.mask_token_id is None:
        raise ValueError(
            f"head 'cloze' needs a tokenizer with a mask token; {name_or_path!r} has none"
        )
    hf_model, info = AutoModelForMaskedLM.from_pretrained(
        name_or_path, config=config, dtype=dtype, output_loading_info=True
    )
    encoder = f"{hf_model.base_model_prefix}."
    fresh = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(encoder))
    if fresh:
        warnings.append(
            f"{name_or_path} has no masked-LM head ({', '.join(fresh)} missing): it was "
            "freshly initialised, so cloze scores mean nothing until it is trained"
        )
    return XLMRCloze(hf_model, table, tokenizer.mask_token_id)


def _build_scorer(
    family: str,
    head: str,
    name_or_path: str,
    config: AutoConfig,
    tokenizer: PreTrainedTokenizerBase,
    num_labels: int,
    table: list[list[int]],
    dtype: torch.dtype,
    warnings: list[str],
) -> LabelScorer:
    if family != "xlmr":
        hf_model = AutoModelForSeq2SeqLM.from_pretrained(name_or_path, config=config, dtype=dtype)
        return MT5LabelWords(hf_model, table)
    if config.model_type not in ("xlm-roberta", "xlm-roberta-xl", "roberta"):
        warnings.append(f"family 'xlmr' loading a {config.model_type!r} checkpoint")
    if head == "classification":
        return _xlmr_classifier(name_or_path, config, num_labels, dtype)
    return _xlmr_cloze(name_or_path, config, tokenizer, table, dtype, warnings)


def load_scorer(
    family: str,
    name_or_path: str | os.PathLike,
    num_labels: int,
    *,
    head: str | None = None,
    label_words: Sequence[str] | Sequence[Sequence[str]] | None = None,
    languages: Sequence[str] | None = None,
    dropout: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[LabelScorer, PreTrainedTokenizerBase, list[str]]:
    """Load tokenizer + model and wrap them as a ``LabelScorer``.

    Returns ``(scorer, tokenizer, warnings)``, the scorer in eval mode. Same path for local
    folders and Hub names; a local folder never touches the network.

    Args:
        family: ``"xlmr"`` or ``"mt5"``.
        head: xlmr: ``"classification"`` (default) | ``"cloze"``; mt5: ``"label_words"``
            (default). ``None`` = the family's default.
        label_words: needed by ``cloze`` and ``label_words``: C words shared by every
            language, or T lists of C words, one per language in the task's language order
            (``lang_ids`` of ``forward`` index these rows); see :func:`label_word_table`.
        languages: the T language codes of per-language ``label_words``, only used to name
            the language in messages (and to check the row count).
        dropout: overrides the config's dropout (xlmr: hidden + attention dropout; mt5:
            ``dropout_rate``).

    xlmr ``classification``: a checkpoint whose classification head has another size (or
    none, e.g. the MLM checkpoint) gets a freshly initialised C-way head. xlmr ``cloze``: the
    checkpoint loads as ``AutoModelForMaskedLM``; one without an MLM head gets a freshly
    initialised one, with a warning.
    """
    head, warnings = _check_scorer_args(family, head, num_labels, dropout, label_words, languages)
    name_or_path = os.fspath(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    config = _load_config(name_or_path, family, dropout)
    table: list[list[int]] = []
    if head in ("cloze", "label_words"):
        if family == "mt5" and not config.is_encoder_decoder:
            raise ValueError(
                f"family 'mt5' needs an encoder-decoder checkpoint; {name_or_path!r} is "
                f"{config.model_type!r}"
            )
        table, word_warnings = label_word_table(tokenizer, label_words, num_labels, languages)
        warnings.extend(word_warnings)
    scorer = _build_scorer(
        family, head, name_or_path, config, tokenizer, num_labels, table, dtype, warnings
    )
    scorer.eval()
    return scorer, tokenizer, warnings
