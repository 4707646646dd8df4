"""tta_stats.py: a run that never reaches the target is the slowest run, never a missing one (a median or trimmed
mean cannot improve by a miss); per-seed counts; `dptrain bench --tta-merge` over real result files, and its refusal
to merge results that measured different things."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dptrain.bench.tta_stats import median_to_target, merge, per_seed, summarise_sides, trimmed_to_target


def run(seed, epochs, seconds, accs=(0.5, 0.9)):
    return {"seed": seed, "epochs_to_target": epochs, "seconds_to_target": seconds, "final_val_acc": accs[-1],
            "best_val_acc": max(accs), "wall_s": 10.0 + seed, "epochs_run": len(accs),
            "curve": [{"epoch": i + 1, "val_acc": a, "seconds": 3.0 * (i + 1)} for i, a in enumerate(accs)]}


def test_a_miss_counts_as_the_slowest_run():
    assert median_to_target([5, 6, None]) == 6  # dropping the miss would give 5.5
    assert median_to_target([5, None, None]) is None  # the median run never got there
    assert median_to_target([4, 6]) == 5 and median_to_target([]) is None
    assert median_to_target([5, None]) is None  # the middle pair holds a miss
    assert trimmed_to_target([5, 5, 6, 7, None]) == pytest.approx(6.0)  # the miss is the dropped slowest
    assert trimmed_to_target([5, 6, None, None]) is None
    assert trimmed_to_target([5, 6]) is None  # fewer than 3 runs: no trimmed mean
    assert trimmed_to_target([9, 1, 5]) == 5


def test_per_seed_pairs_the_same_seeds_and_counts_misses_as_slowest():
    mine = [run(0, 5, 1), run(1, 6, 1), run(2, None, None), run(3, 4, 1), run(9, 1, 1)]
    theirs = [run(0, 6, 1), run(1, 6, 1), run(2, 7, 1), run(3, None, None), run(8, 1, 1)]
    assert per_seed(mine, theirs) == {"fewer": 2, "equal": 1, "more": 1}
    assert per_seed([run(1, None, None)], [run(1, None, None)]) == {"fewer": 0, "equal": 1, "more": 0}
    assert per_seed([run(0, 5, 1)], [run(1, 5, 1)]) is None


def test_summary_ratios_and_the_mean_curve():
    r = summarise_sides({}, {"dptrain": [run(0, 1, 4.0), run(1, 2, 8.0), run(2, 2, 6.0, (0.4, 0.6, 0.8))],
                             "torch": [run(0, 2, 8.0), run(1, 2, 10.0), run(2, None, None, (0.3, 0.4))]})
    d, t = r["dptrain"], r["torch"]
    assert d["epochs_to_target"] == 2 and d["seconds_to_target"] == 6.0 and d["reached"] == 3
    assert t["seconds_to_target"] == 10.0 and t["reached"] == 2  # 8, 10, never -> median 10
    assert d["trimmed_seconds_to_target"] == 6.0 and t["trimmed_seconds_to_target"] == 10.0
    assert r["seconds_to_target_ratio"] == 0.6 and r["per_seed"] == {"fewer": 2, "equal": 1, "more": 0}
    assert [p["runs"] for p in d["mean_val_acc"]] == [3, 3, 1]
    assert d["mean_val_acc"][1]["val_acc"] == pytest.approx((0.9 + 0.9 + 0.6) / 3, abs=1e-4)


def _result(seeds, target=0.8, cpu="AMD EPYC", lr=0.05):
    runs = {s: [run(k, 5 + k % 2, 40.0 + k) for k in seeds] for s in ("dptrain", "torch")}
    base = {"target": target, "cpu": cpu, "cpus": 2, "workers": 2, "seeds": list(seeds),
            "dataset": {"path": "data/synth", "num_classes": 80, "image_size": 64}, "recipe": {"lr": lr, "epochs": 8},
            "dptrain_model": {"bn_momentum": 0.3}, "torch_model": {"bn_momentum": 0.1}}
    return summarise_sides(base, runs)


def test_merge_concatenates_the_runs_of_results_that_measured_the_same_thing(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_result([0, 1, 2])))
    b.write_text(json.dumps(_result([3, 4])))
    m = merge([a, b])
    assert m["seeds"] == [0, 1, 2, 3, 4] and m["merged_from"] == [str(a), str(b)]
    assert [q["seed"] for q in m["dptrain"]["runs"]] == [0, 1, 2, 3, 4] and m["dptrain"]["reached"] == 5
    assert m["per_seed"] == {"fewer": 0, "equal": 5, "more": 0} and m["epochs_to_target_ratio"] == 1.0
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "dptrain", "bench", "--tta-merge", str(a), str(b), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "per seed, dptrain needed fewer epochs on 0, as many on 5, more on 0" in proc.stdout
    assert json.loads((out / "tta.json").read_text())["seeds"] == [0, 1, 2, 3, 4]
    assert (out / "tta.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("other,what", [(dict(target=0.9), "target"), (dict(cpu="Intel Xeon"), "cpu"),
                                        (dict(lr=0.1), "recipe")])
def test_merge_refuses_results_of_different_measurements(tmp_path, other, what):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_result([0, 1])))
    b.write_text(json.dumps(_result([2], **other)))
    with pytest.raises(SystemExit, match=f"b.json: {what} is"):
        merge([a, b])
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(SystemExit, match="c.json: cannot read it"):
        merge([a, tmp_path / "c.json"])
