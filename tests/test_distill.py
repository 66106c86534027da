"""Self-distillation pair sets and KL loss vs. a naive per-pair loop (values and gradients)."""

from __future__ import annotations

import itertools

import pytest
import torch

from alsace_ds.method import pairs as pairs_module
from alsace_ds.method.pairs import PAIR_POLICIES, build_pairs, pair_kl_loss

LANGS = ["en", "a", "b", "c"]

# ---------------------------------------------------------------- pair sets


def test_pairs_crafted_ordered() -> None:
    # en=0, a=1, b=2, c=3; teachers en, b.
    assert build_pairs(LANGS, ["en", "b"]) == [(0, 2), (1, 0), (1, 2), (2, 0), (3, 0), (3, 2)]
    assert build_pairs(LANGS, ["b", "en"], pairs="ordered") == build_pairs(LANGS, ["en", "b"])


def test_pairs_crafted_unordered() -> None:
    # {en,a}: a->en; {en,b}: b->en (en is the earlier teacher); {en,c}: c->en;
    # {a,b}: a->b; {a,c}: no teacher, dropped; {b,c}: c->b.
    assert build_pairs(LANGS, ["en", "b"], pairs="unordered") == [
        (1, 0),
        (2, 0),
        (3, 0),
        (1, 2),
        (3, 2),
    ]


def test_pairs_single_teacher_and_all_teachers() -> None:
    assert build_pairs(["x", "y", "z"], ["y"]) == [(0, 1), (2, 1)]
    assert build_pairs(["x", "y", "z"], ["y"], pairs="unordered") == [(0, 1), (2, 1)]
    every = build_pairs(["x", "y", "z"], ["x", "y", "z"])
    assert every == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    once = build_pairs(["x", "y", "z"], ["z", "x", "y"], pairs="unordered")
    assert once == [(1, 0), (2, 0), (2, 1)]
    assert build_pairs(["en"], ["en"]) == [] and build_pairs(["en"], ["en"], "unordered") == []


@pytest.mark.parametrize("num_teachers", [1, 3, 7, 15])
def test_pair_counts_for_xnli(num_teachers: int) -> None:
    langs = [f"l{k}" for k in range(15)]
    teachers = langs[:num_teachers]
    ordered = build_pairs(langs, teachers)
    unordered = build_pairs(langs, teachers, pairs="unordered")
    assert len(ordered) == num_teachers * 14
    assert len(unordered) == num_teachers * (num_teachers - 1) // 2 + num_teachers * (
        15 - num_teachers
    )
    # Never a student on the teacher side; never a student-student pair.
    for t1, t2 in ordered + unordered:
        assert langs[t2] in teachers and t1 != t2


def test_pair_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        build_pairs(LANGS, [])
    with pytest.raises(ValueError, match="not in languages"):
        build_pairs(LANGS, ["en", "zz"])
    with pytest.raises(ValueError, match="duplicate languages"):
        build_pairs(["en", "a", "en"], ["en"])
    with pytest.raises(ValueError, match="duplicate teachers"):
        build_pairs(LANGS, ["en", "en"])
    with pytest.raises(ValueError, match="pairs must be"):
        build_pairs(LANGS, ["en"], pairs="both")  # type: ignore[arg-type]


# ---------------------------------------------------------------- naive reference


def naive_pairs(langs: list[str], teachers: list[str], mode: str) -> list[tuple[int, int]]:
    """Pair set from the definitions, with plain loops (t2 = teacher side)."""
    out = []
    if mode == "ordered":
        for i in range(len(langs)):
            for j in range(len(langs)):
                if i != j and langs[j] in teachers:
                    out.append((i, j))
    else:
        for i in range(len(langs)):
            for j in range(i + 1, len(langs)):
                if langs[i] in teachers:
                    out.append((j, i))
                elif langs[j] in teachers:
                    out.append((i, j))
    return out


def naive_loss(
    logits: torch.Tensor,
    langs: list[str],
    teachers: list[str],
    mode: str,
    direction: str,
    detach: bool,
) -> torch.Tensor:
    """Mean over (example, pair) of KL with explicit sums over labels."""
    total, count = logits.sum() * 0, 0
    for b in range(logits.shape[0]):
        for t1, t2 in naive_pairs(langs, teachers, mode):
            lp1 = torch.log_softmax(logits[b, t1], dim=-1)
            lp2 = torch.log_softmax(logits[b, t2], dim=-1)
            if detach:
                lp2 = lp2.detach()
            p, lp, lq = (lp1.exp(), lp1, lp2) if direction == "forward" else (lp2.exp(), lp2, lp1)
            kl = 0
            for c in range(logits.shape[-1]):
                kl = kl + p[c] * (lp[c] - lq[c])
            total = total + kl
            count += 1
    return total / max(count, 1)


OPTIONS = list(itertools.product(["ordered", "unordered"], ["forward", "reverse"], [False, True]))


@pytest.mark.parametrize(("mode", "direction", "detach"), OPTIONS)
@pytest.mark.parametrize("num_labels", [2, 3])
def test_loss_and_grad_match_naive(mode: str, direction: str, detach: bool, num_labels: int):
    gen = torch.Generator().manual_seed(OPTIONS.index((mode, direction, detach)) * 10 + num_labels)
    langs = ["en", "fr", "de", "zh", "sw"]
    teachers = ["fr", "en", "zh"]
    logits = (
        torch.randn(4, 5, num_labels, generator=gen, dtype=torch.float64) * 2
    ).requires_grad_()
    loss = pair_kl_loss(
        torch.log_softmax(logits, -1),
        langs,
        teachers,
        pairs=mode,
        direction=direction,
        detach_teacher=detach,
    )
    (grad,) = torch.autograd.grad(loss, logits)
    ref = naive_loss(logits, langs, teachers, mode, direction, detach)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-15)
    assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-14)
    assert loss.item() > 0


@pytest.mark.parametrize(("mode", "direction"), [("ordered", "forward"), ("unordered", "reverse")])
def test_detach_changes_gradient_not_value(mode: str, direction: str) -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    kw = dict(pairs=mode, direction=direction)
    both = pair_kl_loss(torch.log_softmax(logits, -1), LANGS, ["en", "b"], **kw)
    stop = pair_kl_loss(
        torch.log_softmax(logits, -1), LANGS, ["en", "b"], detach_teacher=True, **kw
    )
    (g_both,) = torch.autograd.grad(both, logits)
    (g_stop,) = torch.autograd.grad(stop, logits)
    assert both.item() == stop.item()
    assert not torch.allclose(g_both, g_stop)
    # Pure students ("a", "c") are never on the teacher side: their gradient is unchanged.
    # Teachers ("en", "b") lose the gradient of their teacher side.
    assert torch.allclose(g_both[:, [1, 3]], g_stop[:, [1, 3]], rtol=1e-12, atol=1e-15)
    assert not torch.allclose(g_both[:, [0, 2]], g_stop[:, [0, 2]])


def test_loss_is_the_mean_over_examples_and_pairs() -> None:
    log_probs = torch.log_softmax(torch.randn(5, 4, 3, dtype=torch.float64), -1)
    pairs = build_pairs(LANGS, ["en", "b"])
    assert len(pairs) == 6
    terms = [
        float((log_probs[b, t1].exp() * (log_probs[b, t1] - log_probs[b, t2])).sum())
        for b in range(5)
        for t1, t2 in pairs
    ]
    loss = pair_kl_loss(log_probs, LANGS, ["en", "b"])
    assert loss.dim() == 0 and loss.item() == pytest.approx(sum(terms) / 30, rel=1e-13)


def test_a_new_pair_policy_is_one_function_and_one_entry(monkeypatch) -> None:
    """Register a policy (students only toward the FIRST teacher) and it works end to end."""

    def first_teacher(num: int, teachers: set[int]) -> list[tuple[int, int]]:
        return [(t1, min(teachers)) for t1 in range(num) if t1 not in teachers]

    monkeypatch.setitem(PAIR_POLICIES, "first_teacher", first_teacher)
    assert build_pairs(LANGS, ["b", "en"], "first_teacher") == [(1, 0), (3, 0)]
    lp = torch.log_softmax(torch.randn(2, 4, 3, dtype=torch.float64), -1)
    loss = pair_kl_loss(lp, LANGS, ["en", "b"], pairs="first_teacher")
    terms = [float((lp[b, t].exp() * (lp[b, t] - lp[b, 0])).sum()) for b in (0, 1) for t in (1, 3)]
    assert loss.item() == pytest.approx(sum(terms) / 4, rel=1e-13)


def test_a_new_direction_is_one_function_and_one_entry(monkeypatch) -> None:
    """A registered direction (here: symmetric KL) reaches the loss by its name."""

    def symmetric(lp1: torch.Tensor, lp2: torch.Tensor) -> torch.Tensor:
        return pairs_module.forward_kl(lp1, lp2) + pairs_module.reverse_kl(lp1, lp2)

    monkeypatch.setitem(pairs_module.DIRECTIONS, "symmetric", symmetric)
    lp = torch.log_softmax(torch.randn(3, 4, 3, dtype=torch.float64), -1)
    both = pair_kl_loss(lp, LANGS, ["en", "b"], direction="symmetric")
    fwd = pair_kl_loss(lp, LANGS, ["en", "b"], direction="forward")
    rev = pair_kl_loss(lp, LANGS, ["en", "b"], direction="reverse")
    assert both.item() == pytest.approx(fwd.item() + rev.item(), rel=1e-13)


def test_identical_views_give_zero_loss() -> None:
    row = torch.log_softmax(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64), -1)
    log_probs = row.expand(2, 4, 3)
    assert pair_kl_loss(log_probs, LANGS, ["a"]).item() == pytest.approx(0.0, abs=1e-15)


def test_low_precision_is_upcast() -> None:
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(4, 4, 3, generator=gen)
    lp16 = torch.log_softmax(logits, -1).bfloat16()
    loss = pair_kl_loss(lp16, LANGS, ["en", "b"])
    assert loss.dtype == torch.float32
    ref = pair_kl_loss(lp16.double(), LANGS, ["en", "b"])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_no_terms_gives_connected_zero() -> None:
    logits = torch.randn(3, 1, 3, requires_grad=True)  # one language: no pair
    loss = pair_kl_loss(torch.log_softmax(logits, -1), ["en"], ["en"])
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and (logits.grad == 0).all()


def test_loss_errors() -> None:
    lp = torch.log_softmax(torch.randn(2, 4, 3), -1)
    with pytest.raises(ValueError, match=r"\[B, T, C\]"):
        pair_kl_loss(lp[0], LANGS, ["en"])
    with pytest.raises(ValueError, match="4 languages but 3"):
        pair_kl_loss(lp, LANGS[:3], ["en"])
    with pytest.raises(ValueError, match="direction"):
        pair_kl_loss(lp, LANGS, ["en"], direction="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        pair_kl_loss(lp, LANGS, [])
