"""The statistics of time-to-accuracy runs (`dptrain bench --tta`) and `dptrain bench --tta-merge A.json B.json ...`.

A run that never reaches the target counts as slower than every run that does (MLPerf's "did not finish"), never
as missing: a median or trimmed mean that lands on such a run is null ("the typical run does not get there"), and
one miss cannot make a side look faster by leaving its slowest run out. Per side:
    epochs_to_target, seconds_to_target   the medians over the runs
    trimmed_*                              the mean without the fastest and the slowest run (MLPerf's olympic mean;
                                           3 runs or more)
    reached                                how many runs hit the target
With both sides over the same seeds, `per_seed` counts the seeds on which dptrain needed fewer, as many or more
epochs than the twin (a seed is one initialisation, split and batch order, the same for both).

--tta-merge concatenates the runs of several tta.json files (e.g. seeds measured in separate sessions) after checking
that they measured the same thing: target, workers, CPU model, dataset, recipe and both models' settings; it writes
OUT/tta.json and OUT/tta.png from the merged runs.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

SIDES = ("dptrain", "torch")
TO_TARGET = ("epochs_to_target", "seconds_to_target")
# what merged files must agree on (the seconds of other CPUs, or another recipe, are another measurement)
SAME = ("target", "workers", "cpu", "dataset", "recipe", "dptrain_model", "torch_model")


def _inf(x):
    return math.inf if x is None else x


def _finite(x):
    return None if x is None or math.isinf(x) else x


def median_to_target(xs: list) -> float | None:
    """Median with never-reached runs (None) counted as the slowest; None when the median run did not get there."""
    return _finite(statistics.median([_inf(x) for x in xs])) if xs else None


def trimmed_to_target(xs: list) -> float | None:
    """Mean without the fastest and the slowest run (3 runs or more), never-reached runs counted as the slowest."""
    if len(xs) < 3:
        return None
    kept = sorted(_inf(x) for x in xs)[1:-1]
    return _finite(statistics.fmean(kept))


def median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def mean_curve(runs: list[dict]) -> list[dict]:
    """Validation accuracy per epoch averaged over the runs that reached that epoch (and how many did)."""
    by_epoch: dict[int, list[float]] = {}
    for r in runs:
        for p in r["curve"]:
            by_epoch.setdefault(p["epoch"], []).append(p["val_acc"])
    return [{"epoch": e, "val_acc": round(statistics.fmean(v), 4), "runs": len(v)} for e, v in sorted(by_epoch.items())]


def per_seed(mine: list[dict], theirs: list[dict]) -> dict | None:
    """Seeds on which `mine` needed fewer / as many / more epochs to the target than `theirs` (never = slowest).
    Runs are paired in order within a seed (--repeat gives several per seed); None when no seed is shared."""
    def by_seed(runs):
        out: dict[int, list] = {}
        for r in runs:
            out.setdefault(r["seed"], []).append(_inf(r["epochs_to_target"]))
        return out
    a, b = by_seed(mine), by_seed(theirs)
    pairs = [(x, y) for s in a if s in b for x, y in zip(a[s], b[s])]
    if not pairs:
        return None
    return {"fewer": sum(x < y for x, y in pairs), "equal": sum(x == y for x, y in pairs),
            "more": sum(x > y for x, y in pairs)}


def summarise_sides(result: dict, runs: dict[str, list[dict]]) -> dict:
    """Fill result[side] for every side in `runs` and, with both sides, the dptrain / torch ratios and per_seed."""
    for side, rs in runs.items():
        result[side] = {"runs": rs, **{k: median_to_target([r[k] for r in rs]) for k in TO_TARGET},
                        **{f"trimmed_{k}": trimmed_to_target([r[k] for r in rs]) for k in TO_TARGET},
                        **{k: median([r[k] for r in rs]) for k in ("final_val_acc", "best_val_acc", "wall_s")},
                        "reached": sum(r["epochs_to_target"] is not None for r in rs), "mean_val_acc": mean_curve(rs)}
    if all(s in runs for s in SIDES):
        for k in (*TO_TARGET, *(f"trimmed_{k}" for k in TO_TARGET), "wall_s"):
            a, b = result["dptrain"][k], result["torch"][k]
            result[f"{k}_ratio"] = round(a / b, 3) if a and b else None
        result["per_seed"] = per_seed(runs["dptrain"], runs["torch"])
    return result


def merge(paths: list[str | Path]) -> dict:
    """One result from several tta.json files that measured the same thing (SystemExit naming the file and the
    setting that differs otherwise)."""
    if not paths:
        raise SystemExit("dptrain bench --tta-merge: give the tta.json files to merge")
    results = []
    for p in paths:
        try:
            r = json.loads(Path(p).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"dptrain bench --tta-merge: {p}: cannot read it ({e})") from None
        if not isinstance(r, dict) or "target" not in r or not any(s in r for s in SIDES):
            raise SystemExit(f"dptrain bench --tta-merge: {p}: not a `dptrain bench --tta` result")
        results.append(r)
    first = results[0]
    for p, r in zip(paths[1:], results[1:]):
        for k in SAME:
            if r.get(k) != first.get(k):
                raise SystemExit(f"dptrain bench --tta-merge: {p}: {k} is {r.get(k)!r}, not {first.get(k)!r} as in "
                                 f"{paths[0]}: these runs measured different things")
    sides = [s for s in SIDES if all(s in r for r in results)]
    if not sides:
        raise SystemExit("dptrain bench --tta-merge: no side (dptrain, torch) is in every file")
    merged = {k: first[k] for k in first if k not in SIDES and not k.endswith("_ratio") and k != "per_seed"}
    merged["seeds"] = [s for r in results for s in r.get("seeds", [])]
    merged["merged_from"] = [str(p) for p in paths]
    return summarise_sides(merged, {s: [run for r in results for run in r[s]["runs"]] for s in sides})
