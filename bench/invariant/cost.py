"""Cost per step of --batch-invariant against the normal step: the default model, 64x64, batch 64, --bn sync,
augmentation off, data/synth; one process and launch --workers 2; each configuration run REPS times, interleaved
(normal and invariant back to back) on a noisy shared machine. A run is STEPS steps; the median step_s of steps
WARM.. of metrics.jsonl is its cost. Writes a JSON line per run and a summary to stdout.

    .venv/bin/python bench/invariant/cost.py [REPS] [STEPS] [BLOCKS...]
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 12
BLOCKS = [int(b) for b in sys.argv[3:]] or [16, 8]
WARM = 2


def run(workers: int, block: int, out: Path) -> float:
    cmd = [str(ROOT / ".venv/bin/python"), "-m", "dptrain", "launch" if workers else "train", "--data", "data/synth",
           "--image-size", "64", "--batch-size", "64", "--epochs", "1", "--out", str(out), "--stop-at-step",
           str(STEPS), "--data.augment=false", "--train.progress=false", "--train.tensorboard=false",
           "--train.patience=0", f"--train.batch_invariant_block={block}"]
    if workers:
        cmd += ["--workers", str(workers), "--bn", "sync"]
    else:
        cmd += ["--dist.bn=sync"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(m["step_s"] for m in steps if "step_s" in m and m["step"] >= WARM)


def main() -> None:
    got: dict[tuple[int, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(REPS):
            for workers in (0, 2):
                for block in [0] + BLOCKS:
                    t = run(workers, block, Path(tmp) / f"r{rep}w{workers}b{block}")
                    got.setdefault((workers, block), []).append(t)
                    print(json.dumps({"rep": rep, "workers": workers, "block": block, "step_s": t,
                                      "at": time.time()}), flush=True)
    for (workers, block), ts in sorted(got.items()):
        base = statistics.median(got[workers, 0])
        print(f"{'1 process' if not workers else f'{workers} workers'} block {block or 'normal':>6}: median "
              f"{statistics.median(ts):.3f} s/step over {len(ts)} runs ({', '.join(f'{t:.3f}' for t in ts)}); "
              f"x{statistics.median(ts) / base:.2f} of normal", flush=True)


if __name__ == "__main__":
    main()
