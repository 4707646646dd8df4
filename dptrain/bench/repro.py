"""`dptrain bench --agree 1,2`: how long runs on two different worker counts stay equal to 1e-6.

Different worker counts compute the same mathematics with sums grouped differently, so their weights agree to float32
rounding at first and part ways later, like any two float32 trainings (README, Reproducibility). This measures it:
both counts train side by side in this process as bitwise replays (replay.py: the bits `launch --workers N` gives),
and after every step the weights' relative difference ‖w_a − w_b‖ / ‖w_a‖ is recorded.
"""
from __future__ import annotations

import numpy as np

from ..config import Config
from ..distributed.replay import parse_layout, replay_executor
from ..train import prepare
from .workers import synth_dataset


def divergence(cfg: Config, counts: tuple[int, int], steps: int) -> list[float]:
    """‖w_a − w_b‖ / ‖w_a‖ after each of the first `steps` steps of `cfg` on counts[0] and counts[1] workers."""
    runs = []
    for n in counts:
        t = prepare(cfg, resume=False)
        runs.append((t, replay_executor(parse_layout(workers=n))(cfg, t.model, t.ds, t.store, t.opt)))
    out = []
    try:
        while len(out) < steps:
            for t, ex in runs:  # one step of the Trainer's loop (train.Trainer.fit)
                batches = t.sampler.batches(t.epoch)
                res = ex.train_step(batches[t.step_in_epoch], t.epoch, t.step, t.lr())
                t.model.update_running_stats(res.bn_moments, cfg.model.bn_momentum)
                t.step, t.step_in_epoch = t.step + 1, t.step_in_epoch + 1
                if t.step_in_epoch == len(batches):
                    t.epoch, t.step_in_epoch = t.epoch + 1, 0
            a, b = (t.store.params.astype(np.float64) for t, _ in runs)
            out.append(float(np.linalg.norm(a - b) / np.linalg.norm(a)))
    finally:
        for _, ex in runs:
            ex.close()
    return out


def agreement(cfg: Config, counts: tuple[int, int], steps: int, tol: float = 1e-6) -> dict:
    """The row `dptrain bench --agree` prints: steps that agree to `tol`, and the difference after each step."""
    diffs = divergence(cfg, counts, steps)
    agree = next((i for i, d in enumerate(diffs) if d > tol), len(diffs))
    return {"workers": list(counts), "tol": tol, "steps": steps, "steps_within_tol": agree,
            "bn": cfg.dist.bn, "rel_diff": [float(f"{d:.3g}") for d in diffs]}


def format_agreement(r: dict) -> str:
    a, b = r["workers"]
    head = (f"{a} vs {b} workers (bn {r['bn']}): the weights agree to {r['tol']:g} for {r['steps_within_tol']} of "
            f"{r['steps']} steps")
    marks = [i for i in (1, 3, 12, 20, r["steps"]) if i <= r["steps"]]
    return head + "\n" + "  ".join(f"step {i}: {r['rel_diff'][i - 1]:.2g}" for i in dict.fromkeys(marks))


def run(args, cfg: Config, overrides: dict[str, str]) -> int:
    """`dptrain bench --agree A,B`: on the bench's synthetic face set (--images, --classes, --image-size), with the
    bench's config (default model, --batch-size, overrides), --steps steps (default 20). With --bn sync unless told
    otherwise: under --bn stats each worker normalises with its own shard's statistics, so different worker counts
    train different functions (they differ from the first step, by design)."""
    import json

    try:
        a, b = (int(x) for x in args.agree.split(","))
    except ValueError:
        raise SystemExit(f"dptrain bench: --agree wants two worker counts A,B, got {args.agree!r}") from None
    data = synth_dataset(args.images, args.image_size, args.classes, args.data_dir, not args.no_progress)
    cfg.data.path, cfg.data.min_images_per_class, cfg.train.progress = str(data), 1, False
    cfg.dist.bn = cfg.dist.bn if "dist.bn" in overrides else "sync"
    r = agreement(cfg, (a, b), args.steps if args.steps_given else 20)
    print(json.dumps(r) if args.json else format_agreement(r), flush=True)
    return 0
