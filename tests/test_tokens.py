"""Views tokenized once (alsace_ds/data/tokens.py): batches equal the tokenizer's own padded
call, token-length batching pads less and changes no probability, the run's cache is reused
and rebuilt when it must be, cloze views without their mask are named; and the training
loop's stop polls run at the agreed cadence."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from alsace_ds import parallel
from alsace_ds.data import tokens as T
from alsace_ds.data.corpus import ParallelCorpus, ParallelExample
from alsace_ds.data.tokens import TokenizedViews, encode_views, tokenize_corpora
from alsace_ds.engine import signals
from alsace_ds.engine.trainer import predict_probs
from alsace_ds.models.scorers import load_scorer
from alsace_ds.models.tiny import build_tiny_model, build_word_tokenizer
from alsace_ds.recipes import loop

WORDS = "the cat sat on a mat dog ran far away hello world is it true".split()


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 14))) for _ in range(n)]


def _reference(tok, views, max_length):
    """The tokenizer's own padded batch: what the trainer built at every step before."""
    kw = dict(padding="longest", max_length=max_length, return_tensors="pt")
    if isinstance(views[0], tuple):
        a, b = zip(*views, strict=True)
        enc = tok(list(a), list(b), truncation="longest_first", **kw)
    else:
        enc = tok(list(views), truncation=True, **kw)
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("family", ["xlmr", "mt5"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pairs", [False, True])
def test_batches_equal_the_tokenizers_padded_call(family, side, pairs):
    tok = build_word_tokenizer(WORDS, family)
    tok.padding_side = side
    views = _texts(40, 1)
    if pairs:
        views = list(zip(views, _texts(40, 2), strict=True))
    toks = TokenizedViews.from_lists(T.tokenize_views(tok, views, 12), T.pad_id(tok), side)
    rng = random.Random(3)
    for _ in range(20):
        pick = rng.sample(range(40), rng.randint(1, 12))
        ids, mask = toks.batch(pick)
        want_ids, want_mask = _reference(tok, [views[i] for i in pick], 12)
        assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)
        sub = toks.select(pick)  # a subset keeps every view's ids
        assert torch.equal(sub.batch(range(len(pick)))[0], want_ids)
    assert encode_views(tok, views[:5], 12)["input_ids"].tolist() == (
        _reference(tok, views[:5], 12)[0].tolist()
    )


def _corpus(langs, n=30, seed=0, path="corpus.jsonl"):
    texts = {x: _texts(n, seed + k) for k, x in enumerate(langs)}
    examples = [ParallelExample(f"ex{i}", {x: texts[x][i] for x in langs}, i % 3) for i in range(n)]
    return ParallelCorpus(path, list(langs), ["a", "b", "c"], examples)


def test_token_length_batches_pad_less_and_change_no_probability(tmp_path):
    """Sorted by token count, batches pad less than sorted by characters (the previous key),
    and the distributions equal one forward per view (no padding at all)."""
    folder = build_tiny_model(tmp_path / "m", "xlmr", WORDS, ["a", "b", "c"], seed=1)
    scorer, tok, _ = load_scorer("xlmr", folder, 3)
    corpus = _corpus(["en", "de"], n=50)
    views = T.corpus_views(corpus, ["en", "de"])
    toks = TokenizedViews.from_lists(T.tokenize_views(tok, views, 16), T.pad_id(tok), "right")
    lengths = toks.lengths.tolist()
    by_tokens = sorted(range(len(views)), key=lambda i: -lengths[i])
    by_chars = sorted(range(len(views)), key=lambda i: -len(views[i]))
    chunks = [by_tokens[i : i + 8] for i in range(0, len(views), 8)]
    char_chunks = [by_chars[i : i + 8] for i in range(0, len(views), 8)]
    assert toks.padding_fraction(chunks) < toks.padding_fraction(char_chunks)
    idx, probs = predict_probs(scorer, toks, parallel.ParallelContext.single(), 8, "t", False)
    assert sorted(idx.tolist()) == list(range(len(views)))
    with torch.no_grad():
        alone = torch.cat([torch.softmax(scorer(*toks.batch([i])), -1) for i in idx.tolist()])
    torch.testing.assert_close(probs, alone, atol=1e-6, rtol=0)


def test_cache_is_reused_and_rebuilt_when_it_must_be(tmp_path, monkeypatch):
    tok = build_word_tokenizer(WORDS, "xlmr")
    corpus = _corpus(["en", "de"])
    specs = [("unlabeled", corpus, ["en", "de"]), ("dev", None, ["en"])]
    calls = []
    real = T.tokenize_views
    monkeypatch.setattr(T, "tokenize_views", lambda *a: calls.append(a[2]) or real(*a))
    first = tokenize_corpora(specs, tok, 16, tmp_path)
    assert first["dev"] is None and calls == [16]
    path = tmp_path / "unlabeled.safetensors"
    again = tokenize_corpora(specs, tok, 16, tmp_path)  # a resume: read, not tokenized
    assert calls == [16]
    assert torch.equal(again["unlabeled"].views.flat, first["unlabeled"].views.flat)
    tokenize_corpora(specs, tok, 8, tmp_path)  # another max_length: tokenized again
    assert calls == [16, 8]
    assert tokenize_corpora(specs, tok, 8, tmp_path, write=False) and calls == [16, 8]
    path.write_bytes(path.read_bytes()[:50])  # a damaged file is rebuilt, never trusted
    tokenize_corpora(specs, tok, 8, tmp_path)
    assert calls == [16, 8, 8]
    corpus.examples[3].views["de"] = "hello"  # other views: tokenized again
    got = tokenize_corpora(specs, tok, 8, tmp_path)["unlabeled"]
    assert calls == [16, 8, 8, 8]
    ids, _ = got.views.batch([got.index(3, "de")])
    assert ids.tolist() == [[tok.cls_token_id, tok.convert_tokens_to_ids("hello"),
                             tok.sep_token_id]]  # fmt: skip


def test_cloze_views_without_their_mask_are_named(tmp_path):
    tok = build_word_tokenizer([*WORDS, "<mask>"], "xlmr")
    corpus = _corpus(["en", "de"], n=4)
    for ex in corpus.examples:
        for x in ex.views:
            ex.views[x] = "hello world <mask>"
    corpus.examples[1].views["de"] = "the cat " * 20 + "<mask>"  # truncated away at 12
    corpus.examples[2].views["en"] = "<mask> is it <mask>"  # twice
    got = tokenize_corpora([("test", corpus, ["en", "de"])], tok, 12, None)["test"]
    problems = T.mask_count_problems(got, corpus, tok.mask_token_id)
    assert problems == [
        "corpus.jsonl: example 'ex1', language 'de': 0 mask tokens",
        "corpus.jsonl: example 'ex2', language 'en': 2 mask tokens",
    ]


def _commits(stop_after=None, clock=None):
    run_cfg = SimpleNamespace(stop_after_steps=stop_after, checkpoint_minutes=0.0,
                              checkpoint_every=0)  # fmt: skip
    run = SimpleNamespace(cfg=SimpleNamespace(run=run_cfg), ctx=parallel.ParallelContext.single())
    return loop.Commits(run)


def test_stop_polls_follow_rank0s_step_time(monkeypatch):
    """The ranks agree on a stop about every POLL_SECONDS of steps, not at every step; a
    request is acted on at the next poll; run.stop_after_steps is exact whatever the cadence."""
    now = [100.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: now[0])
    polls = []
    real = parallel.all_max
    monkeypatch.setattr(parallel, "all_max", lambda v, ctx: polls.append(v) or real(v, ctx))
    commits = _commits()
    commits.start_stage()
    engine = SimpleNamespace(global_steps=0)
    commits.save = lambda *a, **k: None  # the commit itself is DeepSpeed's
    for _ in range(30):  # 0.1 s per step -> a poll every 20 steps (POLL_SECONDS = 2)
        now[0] += 0.1
        engine.global_steps += 1
        commits.boundary("distill", engine, engine.global_steps, False, None)
    assert [p[2] for p in polls] == [20, 20] and commits.next_poll == 41  # steps 1 and 21
    signals.clear()
    signals.request("SIGUSR1")
    try:
        for _ in range(10):  # steps 31-40: the request waits for the next poll
            commits.boundary("distill", engine, 0, False, None)
        with pytest.raises(signals.Preempted, match=r"SIGUSR1"):
            commits.boundary("distill", engine, 0, False, None)  # step 41
    finally:
        signals.clear()
    assert len(polls) == 3
    counted = _commits(stop_after=3)
    counted.save = lambda *a, **k: None
    counted.start_stage()
    counted.boundary("stage0", engine, 1, False, None)
    counted.boundary("stage0", engine, 2, False, None)
    with pytest.raises(signals.Preempted, match="run.stop_after_steps"):
        counted.boundary("stage0", engine, 3, False, None)
