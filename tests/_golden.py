"""What a run computed, in a form to compare across versions of the code: the teachers and
each language's shat_t / s_t, the per-language accuracies, every logged training loss, the
guard's English dev accuracy per check and the argmax of every saved test prediction.

``python tests/_golden.py RUN_DIR OUT.json`` records one (``tests/golden/`` holds those of
the code before the views were tokenized once: issue 14's "the same pseudo-labels, teachers,
losses and reports as before")."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def record(run_dir: Path) -> dict:
    sel = json.loads((run_dir / "selection.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())
    tb = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    tb.Reload()
    losses = {t: [e.value for e in tb.Scalars(t)] for t in tb.Tags()["scalars"]
              if t.endswith("/train/loss")}  # fmt: skip
    preds = {}
    for name in ("test_before", "test_after"):
        path = run_dir / "predictions" / f"{name}.safetensors"
        rows = load_file(str(path))["probs"].argmax(-1).tolist()  # [N, T], C <= 10 labels
        preds[name] = ["".join(map(str, r)) for r in rows]  # one string per example
    guard = report.get("guard") or {}
    return {
        "teachers": sel["teachers_used"],
        "shat_t": {k: v["shat_t"] for k, v in sel["languages"].items()},
        "s_t": {k: v["s_t"] for k, v in sel["languages"].items()},
        "accuracy": {w: report[w]["accuracy"] for w in ("before", "after")},
        "losses": losses,
        "guard_en": [c["english_accuracy"] for c in guard.get("checks", [])],
        "argmax": preds,
    }


def compare(got: dict, want: dict, rel: float = 1e-5) -> list[str]:
    """Every difference: exact for teachers, accuracies, argmaxes and guard accuracies;
    within ``rel`` for the confidences and losses (float sums in another batch order)."""
    bad = [f"{k}: {got[k]} != {want[k]}" for k in ("teachers", "accuracy", "guard_en")
           if got[k] != want[k]]  # fmt: skip
    for k in ("shat_t", "s_t"):
        bad += [f"{k}[{x}]: {got[k][x]} vs {v}" for x, v in want[k].items()
                if abs(got[k][x] - v) > rel * abs(v)]  # fmt: skip
    for tag, values in want["losses"].items():
        mine = got["losses"].get(tag, [])
        same = len(mine) == len(values) and all(
            abs(a - b) <= rel * abs(b) for a, b in zip(mine, values, strict=True)
        )
        if not same:
            bad.append(f"losses {tag}: {mine} vs {values}")
    for name, rows in want["argmax"].items():
        mine = got["argmax"][name]
        if len(mine) != len(rows):
            bad.append(f"{name}: {len(mine)} examples, not {len(rows)}")
            continue
        pairs = zip("".join(mine), "".join(rows), strict=True)
        flips = sum(a != b for a, b in pairs)
        if flips:
            bad.append(f"{name}: {flips} predictions differ")
    return bad


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(json.dumps(record(Path(sys.argv[1]))) + "\n")
