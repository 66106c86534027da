"""Distributed teacher selection on REAL gloo process groups equals the one-process result.

Each rank runs ``init_distributed`` (DS_ACCELERATOR=cpu) and ``select_from_views`` with
``reducer(ctx)`` on an uneven share of the (example, language) views.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _dist_helpers import launch, prebuild_shm_op, run_code
from alsace_ds.method.selection import select_teachers
from alsace_ds.parallel import (
    ParallelContext,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    reducer,
)

LANGS = ["en", "fr", "es", "de", "el", "bg", "ru"]


@pytest.fixture(scope="module", autouse=True)
def _shm_op_built() -> None:
    prebuild_shm_op()


def _probs(n: int, t: int, c: int, seed: int, quantize: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if quantize:
        logits = torch.randint(0, quantize, (n, t, c), generator=gen).double()
    else:
        logits = torch.randn(n, t, c, generator=gen, dtype=torch.float64) * 2
    return torch.softmax(logits, dim=-1)


def _cases(world: int) -> list[dict]:
    """Views assigned to ranks unevenly: random, nearly empty ranks, by language, ties."""
    gen = torch.Generator().manual_seed(100 + world)
    cases = []

    probs = _probs(40, 7, 3, seed=world)
    owner = torch.randint(0, world, (40 * 7,), generator=gen)
    cases.append(dict(name="random", probs=probs, owner=owner, languages=LANGS))

    probs = _probs(30, 5, 3, seed=10 + world)
    owner = torch.zeros(30 * 5, dtype=torch.long)
    owner[[3, 77]] = world - 1  # the last rank holds two views; middle ranks hold none
    cases.append(dict(name="few_views", probs=probs, owner=owner, languages=LANGS[:5]))

    probs = _probs(24, 6, 2, seed=20 + world, quantize=2)  # vote ties (3 vs 3) everywhere
    owner = torch.randint(0, world, (24 * 6,), generator=gen)
    cases.append(dict(name="ties_c2", probs=probs, owner=owner, languages=LANGS[:6]))

    probs = _probs(24, 4, 3, seed=30 + world, quantize=2)
    owner = torch.arange(4).repeat(24) % world  # whole languages per rank, uneven
    cases.append(dict(name="ties_by_lang", probs=probs, owner=owner, languages=LANGS[:4]))

    probs = _probs(35, 7, 3, seed=40 + world)
    owner = torch.randint(0, world, (35 * 7,), generator=gen)
    cases.append(
        dict(name="fixed_threshold", probs=probs, owner=owner, languages=LANGS, threshold=0.15)
    )

    probs = torch.tensor([0.913, 0.087], dtype=torch.float64).expand(33, 7, 2).clone()
    owner = torch.randint(0, world, (33 * 7,), generator=gen)
    cases.append(dict(name="all_equal", probs=probs, owner=owner, languages=LANGS))
    return cases


def _check_rank(res: dict, world: int, rank: int, cases: list[dict]) -> None:
    assert res["ctx"] == (rank, world, rank, "cpu")
    assert res["all_reduce_int64"] == [world * (world + 1) // 2, 10 * world * (world + 1) // 2]
    assert res["input_untouched"]
    assert res["all_reduce_float64"][0] == pytest.approx(0.1 * sum(range(world)), abs=1e-15)
    assert res["broadcast"] == {"from": 0}
    assert res["broadcast_last"] == (world - 1) * 7
    assert res["gather"] == [f"r{r}" for r in range(world)]
    assert res["decide"] == {"read_by": 0}
    assert res["partitions"] == [10.0 * r + i for r in range(world) for i in range(3)][:-1]
    for case in cases:
        got = res["cases"][case["name"]]
        want = select_teachers(case["probs"], case["languages"], case.get("threshold"))
        assert got["num_views"] == int((case["owner"] == rank).sum())
        assert got["pseudo_labels"] == want.pseudo_labels.tolist(), case["name"]
        assert got["dict"]["teachers"] == want.teachers, case["name"]
        assert got["dict"]["students"] == want.students, case["name"]
        assert got["dict"]["threshold"] == pytest.approx(want.threshold, abs=1e-12)
        assert got["confidence"] == pytest.approx(want.confidence.tolist(), abs=1e-6)
        assert got["scores"] == pytest.approx(want.scores.tolist(), abs=1e-6)
        assert got["agreement"] == pytest.approx(want.agreement.tolist(), abs=1e-12)


@pytest.mark.launch
@pytest.mark.parametrize("world", [2, 3])
def test_distributed_selection_equals_single_process(world: int, tmp_path: Path) -> None:
    cases = _cases(world)
    spec = tmp_path / "spec.pt"
    torch.save({"cases": cases, "timeout_s": 60.0}, spec)
    out = launch(world, [str(spec), str(tmp_path)], tmp_path, timeout_s=240)
    for rank, (rc, log) in enumerate(out):
        assert rc == 0, f"rank {rank} exited with {rc}:\n{log[-3000:]}"
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for rank, res in enumerate(results):
        _check_rank(res, world, rank, cases)
    # Sanity of the cases themselves: the teacher/student split is non-trivial somewhere,
    # and the all-equal case makes every language a teacher on every rank.
    assert any(results[0]["cases"][c["name"]]["dict"]["students"] for c in cases)
    for res in results:
        assert res["cases"]["all_equal"]["dict"]["teachers"] == LANGS
        assert res["cases"]["few_views"]["num_views"] in (0, 2, 148)
    for name in results[0]["cases"]:  # bit-identical on every rank
        first = {k: v for k, v in results[0]["cases"][name].items() if k != "num_views"}
        for res in results[1:]:
            assert {k: v for k, v in res["cases"][name].items() if k != "num_views"} == first


@pytest.mark.launch
@pytest.mark.parametrize("mode", ["exit", "stall"])
def test_dead_or_stalled_peer_fails_instead_of_hanging(mode: str, tmp_path: Path) -> None:
    # "exit": the peer process is gone (gloo sees the closed connection); "stall": the peer
    # is alive but never joins, so only the process-group timeout (3 s here) ends the wait.
    spec = tmp_path / "spec.pt"
    torch.save({"cases": [], "timeout_s": 3.0, "die_rank": 1, "die_mode": mode}, spec)
    out = launch(2, [str(spec), str(tmp_path)], tmp_path, timeout_s=120)
    rc0, log0 = out[0]
    assert out[1][0] == 0
    assert rc0 not in (0, -9), f"rank 0 should fail on its own, got {rc0}:\n{log0[-2000:]}"
    expected = "by peer" if mode == "exit" else "Timed out"
    assert expected in log0, log0[-2000:]


def test_single_context_collectives_are_local() -> None:
    ctx = ParallelContext.single()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    t = torch.tensor([1.5, 2.5])
    out = all_reduce_sum(t, ctx)
    assert out.tolist() == [1.5, 2.5] and out is not t
    assert reducer(ctx)(t).tolist() == [1.5, 2.5]
    assert broadcast_object({"a": 1}, ctx) == {"a": 1}
    assert all_gather_object("x", ctx) == ["x"]
    barrier(ctx)


@pytest.mark.launch
def test_plain_python_process_initialises_a_world_of_one(tmp_path: Path) -> None:
    code = (
        "import torch, torch.distributed as td\n"
        "from alsace_ds import parallel\n"
        "ctx = parallel.init_distributed(timeout_s=30)\n"
        "assert (ctx.rank, ctx.world_size, ctx.local_rank) == (0, 1, 0), ctx\n"
        "assert td.is_initialized() and td.get_backend() == 'gloo'\n"
        "assert parallel.init_distributed(timeout_s=30) == ctx\n"
        "assert parallel.all_reduce_sum(torch.tensor([3]), ctx).tolist() == [3]\n"
        "parallel.shutdown()\n"
        "print('OK')\n"
    )
    proc = run_code(code, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.output, proc.output[-4000:]
