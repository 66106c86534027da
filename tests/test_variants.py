"""The paper's remaining distillation variants, against plain-loop references: the two
weak-language ablations of Table 3 (``pairs=teachers_only``, ``students_teach=False``) and
full-language self-training's choice of pseudo-labels (Table 4)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_distill import naive_pairs as distill_pairs

from _launch import check_report, recompute_for, run_single, stage0_used
from alsace_ds.method.pairs import build_pairs, pair_kl_loss
from alsace_ds.method.selection import most_confident
from alsace_ds.recipes.strategies import DISTILL_METHODS, kept_per_language

LANGS = ["en", "fr", "de", "zh", "sw"]
TEACHERS = ["fr", "en", "zh"]  # students: de, sw


def naive_pairs(langs: list[str], teachers: list[str], mode: str) -> list[tuple[int, int]]:
    """(t1, t2) from the definitions with plain loops; t2 is the teacher side."""
    if mode == "teachers_only":
        T = len(langs)
        return [(i, j) for i in range(T) for j in range(T)
                if i != j and langs[i] in teachers and langs[j] in teachers]  # fmt: skip
    return distill_pairs(langs, teachers, mode)  # ordered / unordered: test_distill's loops


def naive_loss(
    lp: torch.Tensor, langs: list[str], teachers: list[str], mode: str, direction: str,
    students_teach: bool,
) -> torch.Tensor:  # fmt: skip
    """Mean over (example, pair) of the KL, one pair at a time; with ``students_teach`` off
    the teacher side of a pair whose t1 is a student is detached."""
    total, count = lp.sum() * 0, 0
    for b in range(lp.shape[0]):
        for t1, t2 in naive_pairs(langs, teachers, mode):
            a, t = lp[b, t1], lp[b, t2]
            if not students_teach and langs[t1] not in teachers:
                t = t.detach()
            p, x, y = (a.exp(), a, t) if direction == "forward" else (t.exp(), t, a)
            total = total + sum(p[c] * (x[c] - y[c]) for c in range(lp.shape[-1]))
            count += 1
    return total / max(count, 1)


def test_teachers_only_pairs() -> None:
    # languages [en, a, b, c], teachers [en, b]: only en <-> b, both directions
    assert build_pairs(["en", "a", "b", "c"], ["en", "b"], "teachers_only") == [(0, 2), (2, 0)]
    assert build_pairs(LANGS, TEACHERS, "teachers_only") == naive_pairs(
        LANGS, TEACHERS, "teachers_only"
    )
    assert build_pairs(LANGS, ["de"], "teachers_only") == []


def test_teachers_only_with_one_teacher_is_a_connected_zero() -> None:
    logits = torch.randn(3, 5, 3, dtype=torch.float64, requires_grad=True)
    loss = pair_kl_loss(torch.log_softmax(logits, -1), LANGS, ["en"], pairs="teachers_only")
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (logits.grad == 0).all()


VARIANTS = [
    *itertools.product(["teachers_only"], ["forward", "reverse"], [True]),
    *itertools.product(["ordered", "unordered"], ["forward", "reverse"], [False]),
]


@pytest.mark.parametrize(("mode", "direction", "students_teach"), VARIANTS)
def test_variant_loss_and_gradients_match_a_per_pair_loop(mode, direction, students_teach):
    """Value and gradient wrt every language's log-probabilities (teachers and students)."""
    gen = torch.Generator().manual_seed(VARIANTS.index((mode, direction, students_teach)))
    lp = torch.log_softmax(torch.randn(4, 5, 3, generator=gen, dtype=torch.float64) * 2, -1)
    lp.requires_grad_()
    loss = pair_kl_loss(lp, LANGS, TEACHERS, pairs=mode, direction=direction,
                        students_teach=students_teach)  # fmt: skip
    (grad,) = torch.autograd.grad(loss, lp)  # [B, T, C]
    ref = naive_loss(lp, LANGS, TEACHERS, mode, direction, students_teach)
    (ref_grad,) = torch.autograd.grad(ref, lp)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12) and loss.item() > 0
    assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-14)
    if mode == "teachers_only":  # the weak languages get no loss at all
        assert (grad[:, [2, 4]] == 0).all() and (grad[:, [0, 1, 3]] != 0).any()


@pytest.mark.parametrize(("mode", "direction"), [("ordered", "forward"), ("unordered", "reverse")])
def test_students_do_not_teach_changes_only_the_teachers_gradients(mode, direction) -> None:
    """Same value; the students' gradients are unchanged; a teacher's gradient is what the
    teacher-teacher pairs alone give it (scaled to the mean over all pairs)."""
    gen = torch.Generator().manual_seed(7)
    lp = torch.log_softmax(torch.randn(3, 5, 3, generator=gen, dtype=torch.float64), -1)
    lp.requires_grad_()
    kw = dict(pairs=mode, direction=direction)
    full = pair_kl_loss(lp, LANGS, TEACHERS, **kw)
    cut = pair_kl_loss(lp, LANGS, TEACHERS, students_teach=False, **kw)
    (g_full,) = torch.autograd.grad(full, lp)
    (g_cut,) = torch.autograd.grad(cut, lp)
    assert cut.item() == full.item()
    teachers, students = [0, 1, 3], [2, 4]
    assert torch.equal(g_full[:, students], g_cut[:, students])
    assert not torch.allclose(g_full[:, teachers], g_cut[:, teachers])
    # the teacher-teacher pairs only, as a mean over ALL pairs of the policy
    n_all = len(naive_pairs(LANGS, TEACHERS, mode))
    tt = [(a, b) for a, b in naive_pairs(LANGS, TEACHERS, mode) if a in teachers]
    fwd = direction == "forward"
    terms = [((lp[:, a].exp() * (lp[:, a] - lp[:, b])) if fwd else
              (lp[:, b].exp() * (lp[:, b] - lp[:, a]))).sum() for a, b in tt]  # fmt: skip
    (g_tt,) = torch.autograd.grad(sum(terms) / (n_all * lp.shape[0]), lp)
    assert torch.allclose(g_cut[:, teachers], g_tt[:, teachers], rtol=1e-10, atol=1e-14)


def test_full_self_training_is_registered_and_keeps_the_top_half_over_all_languages() -> None:
    """The pseudo-label choice full self-training makes (via ``most_confident`` over the
    example-major [N*T, C] views) against a naive sort over all N*T views together."""
    assert "full_self_training" in DISTILL_METHODS
    gen = torch.Generator().manual_seed(3)
    N, T, C = 7, 3, 3
    probs = torch.softmax(torch.randn(N, T, C, generator=gen, dtype=torch.float64) * 2, -1)
    langs = ["en", "fr", "sw"]
    keys = [(i, lang) for i in range(N) for lang in langs]
    keep, labels = most_confident(probs.reshape(N * T, C), 0.5)
    kept = [keys[v] for v in keep.tolist()]
    flat = [(float(probs[i, t].max()), i, t) for i in range(N) for t in range(T)]
    top = sorted(sorted(range(N * T), key=lambda v: (-flat[v][0], v))[: N * T // 2])
    assert kept == [(flat[v][1], langs[flat[v][2]]) for v in top]
    assert labels.tolist() == [int(probs[flat[v][1], flat[v][2]].argmax()) for v in top]
    counts = kept_per_language(kept, langs)
    assert counts == {x: sum(1 for v in top if langs[flat[v][2]] == x) for x in langs}
    assert sum(counts.values()) == N * T // 2


@pytest.mark.launch
def test_full_self_training_run(tmp_path, cache, stage0_model):
    """Table 4's full-language self-training through the real entry point, against one
    process: it keeps the most confident half of ALL N x T views of the start model (counted
    per language in its log line, self_training.json and results/final.json), and its first
    loss is their mean cross-entropy at the start weights (a wrong label, language id, half,
    pooling or start changes it)."""
    out, N = tmp_path / "fst", 200
    res = run_single(
        [f"run.output_dir={out}", "stage0.enabled=false", f"stage0.init_from={stage0_model}",
         "distill.method=full_self_training",
         f"task.max_unlabeled={N}", "distill.max_steps=3", "distill.lr=1e-4",
         "distill.micro_batch=700", "model.dropout=0.0", "run.log_every=1", "log.progress=false"],
        cache,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:]
    start = stage0_used(out, res.stdout)
    assert start == stage0_model
    cfg, probs, _ = recompute_for(out, start, "unlabeled_file")  # [N, T, C]
    langs = cfg.task.languages
    T = len(langs)
    flat = probs.double().reshape(N * T, -1)  # example-major: view v = (v // T, langs[v % T])
    top, label = flat.max(-1)
    kept = sorted(sorted(range(N * T), key=lambda v: (-float(top[v]), v))[: N * T // 2])
    counts = {x: sum(1 for v in kept if v % T == t) for t, x in enumerate(langs)}
    assert len(set(counts.values())) > 1  # a real pooling over languages, not per language
    per = ", ".join(f"{x} {c}" for x, c in counts.items())
    assert (f"kept the {N * T // 2} most confident of {N * T} pseudo-labels over all "
            f"languages ({per})") in res.stdout  # fmt: skip
    record = json.loads((out / "self_training.json").read_text())
    assert record == {"views": N * T, "kept": N * T // 2, "kept_per_language": counts}
    assert json.loads((out / "results" / "final.json").read_text())["self_training"] == record
    first = -float(torch.stack([flat[v, label[v]].log() for v in kept]).mean())
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    losses = {e.step: e.value for e in acc.Scalars("distill/train/loss")}
    assert sorted(losses) == [1, 2, 3]
    assert losses[1] == pytest.approx(first, rel=1e-4), (losses, first)
    assert losses[3] < losses[1]  # it trained on them
    report = check_report(out, start, out / "final" / "model")
    assert report["method"] == "full_self_training"


def test_kept_per_language_counts_an_extra_training_language() -> None:
    kept = [(0, "fr"), (1, "en"), (2, "fr"), (2, "xx")]
    assert kept_per_language(kept, ["en", "fr", "sw"]) == {"en": 1, "fr": 2, "sw": 0, "xx": 1}
