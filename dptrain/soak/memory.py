"""`dptrain soak --steps N --workers W`: one long launch with every process's memory, fds and threads sampled.

Samples start with the launcher. Training time runs from the first sample that sees a step record in metrics.jsonl
to the last that does not see the last one (after it: the final checkpoint and shut-down). Its first --warmup
(allocators, caches, BLAS buffers), and at least everything up to the first epoch's end (the first evaluation and
checkpoints allocate once), is not judged. Of the samples after it, the first 10 % are the baseline and the last
10 % the end, per process, for USS (the memory only that process holds) and PSS (its share of the pages it shares:
shared memory, libraries): growth = median(end) / median(baseline) - 1, and the floor's growth, the same with the
10th percentiles. A check fails when both exceed --max-growth: a leak lifts both, while a plateau lifts only the
median (in the 2000-step soak the launcher's USS stepped ~60 MiB up for up to 35 s at a time and back down,
presumably freed memory the allocator kept for a while). Open fds must have the same minimum at both ends (a leak
lifts the floor; a checkpoint file open while the writer thread writes it, saver.py, is not a leak); the run's
/dev/shm segments must not change in number or size at any sample of the training time.
"""
from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import psutil

from .runs import Run, completion, fail_lines, leftovers, progress, remove_segments, settings, shm_usage

MB = 2**20


class Sampler:
    """Samples of a Run's launcher and workers; each process keeps one label (rank1, a replacement rank1#2)."""

    def __init__(self, run: Run, out: Path):
        self.run, self.metrics = run, out / "metrics.jsonl"
        self.samples: list[dict] = []
        self.labels: dict[int, str] = {}
        self.steps, self._offset, self._rest = 0, 0, b""

    def _label(self, pid: int, base: str) -> str:
        if pid not in self.labels:
            n = sum(1 for v in self.labels.values() if v.split("#")[0] == base)
            self.labels[pid] = base if n == 0 else f"{base}#{n + 1}"
        return self.labels[pid]

    def _count_steps(self) -> int:
        try:
            with open(self.metrics, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return self.steps
        self._offset += len(chunk)
        lines = (self._rest + chunk).split(b"\n")
        self._rest = lines.pop()
        self.steps += sum(1 for line in lines if b'"loss"' in line and b'"train_loss"' not in line)
        return self.steps

    def sample(self) -> dict:
        procs = {}
        for pid, base in [(self.run.pid, "launcher")] + [(p.pid, f"rank{r}") for r, p in
                                                           sorted(self.run.workers().items())]:
            try:
                p = psutil.Process(pid)
                with p.oneshot():
                    if p.status() == psutil.STATUS_ZOMBIE:
                        continue
                    mem, fds, threads = p.memory_full_info(), p.num_fds(), p.num_threads()
            except psutil.Error:
                continue
            procs[self._label(pid, base)] = {"pid": pid, "uss": mem.uss, "pss": mem.pss, "fds": fds,
                                             "threads": threads}
        count, size = shm_usage(self.run.run_id)
        s = {"t": round(time.monotonic() - self.run.t0, 3), "steps": self._count_steps(), "shm_count": count,
             "shm_bytes": size, "procs": procs}
        self.samples.append(s)
        return s


def training_span(samples: list[dict], total: int, warmup: float, epoch_steps: int = 0) -> tuple[float, float, float]:
    """(start, end of warm-up, end) of the training time, in seconds since the launch. The warm-up lasts at least
    until the first epoch's end (its evaluation and first checkpoints allocate once) is behind."""
    start = next((s["t"] for s in samples if s["steps"] >= 1), samples[0]["t"])
    during = [s["t"] for s in samples if 1 <= s["steps"] < total]  # a sample that sees the last step sees the end
    end = during[-1] if during else next((s["t"] for s in samples if s["steps"] >= total), samples[-1]["t"])
    epoch1 = next((s["t"] for s in samples if s["steps"] > epoch_steps), end) if 0 < epoch_steps < total else start
    return start, min(max(start + warmup * (end - start), epoch1), end), end


def _low(values) -> float:
    """The 10th percentile: a window's floor, blind to the allocator's plateaus and to a brief dip."""
    v = sorted(values)
    return v[int(0.1 * len(v))]


def analyse(samples: list[dict], total: int, args, epoch_steps: int = 0) -> tuple[dict, dict, list[str]]:
    """Per process figures, the shared-memory figures, and the failed checks (one line each)."""
    if not samples:
        return {}, {}, ["no sample was taken"]
    start, judged, end = training_span(samples, total, args.warmup, epoch_steps)
    window = [s for s in samples if judged <= s["t"] <= end]
    failures, procs = [], {}
    labels = sorted({k for s in window for k in s["procs"]}, key=lambda k: (k != "launcher", k))
    for label in labels:
        rows = [s["procs"][label] for s in window if label in s["procs"]]
        k = max(1, round(0.1 * len(rows)))
        r = {"pid": rows[0]["pid"], "samples": len(rows)}
        for key in ("uss", "pss"):
            first, last = (statistics.median(x[key] for x in w) / MB for w in (rows[:k], rows[-k:]))
            floor0, floor1 = (_low(x[key] for x in w) / MB for w in (rows[:k], rows[-k:]))
            growth = 100 * (last / first - 1) if first else 0.0
            floor_growth = 100 * (floor1 / floor0 - 1) if floor0 else 0.0
            r |= {f"{key}_mb_first": round(first, 2), f"{key}_mb_last": round(last, 2),
                  f"{key}_growth_pct": round(growth, 2), f"{key}_floor_growth_pct": round(floor_growth, 2),
                  f"{key}_mb_max": round(max(x[key] for x in rows) / MB, 2)}
            if min(growth, floor_growth) > args.max_growth and last - first > args.slack_mb:
                failures.append(f"{label}: {key.upper()} grew {growth:.1f} % after warm-up ({first:.1f} -> "
                                f"{last:.1f} MiB; its floor {floor_growth:+.1f} %; limit {args.max_growth:g} %)")
        fd_first = min(x["fds"] for x in rows[:k])
        fd_last = min(x["fds"] for x in rows[-k:])
        r |= {"fds_first": fd_first, "fds_last": fd_last, "fds_min": min(x["fds"] for x in rows),
              "fds_max": max(x["fds"] for x in rows), "fds_constant": fd_first == fd_last,
              "threads_min": min(x["threads"] for x in rows), "threads_max": max(x["threads"] for x in rows)}
        if fd_first != fd_last:
            failures.append(f"{label}: open fds went from {fd_first:g} to {fd_last:g} after warm-up")
        procs[label] = r
    if len(window) < 2:
        failures.append(f"only {len(window)} sample(s) after warm-up: run more steps or lower --interval")
    training = [s for s in samples if start <= s["t"] <= end]
    counts = {s["shm_count"] for s in training}
    sizes = {s["shm_bytes"] for s in training}
    shm = {"count_min": min(counts), "count_max": max(counts), "mb_min": round(min(sizes) / MB, 2),
           "mb_max": round(max(sizes) / MB, 2), "constant": len(counts) == 1 and len(sizes) == 1}
    if not shm["constant"]:
        failures.append(f"shared memory changed during training: {min(counts)}-{max(counts)} segments, "
                        f"{shm['mb_min']}-{shm['mb_max']} MiB")
    if max(counts) == 0:
        failures.append("no shared-memory segment of the run was seen (is it a one-host launch?)")
    workers = sorted(k for k in labels if k != "launcher")
    if len(workers) != args.workers:
        failures.append(f"{len(workers)} worker process(es) sampled after warm-up ({', '.join(workers)}), "
                        f"{args.workers} expected")
    shm["span_s"] = {"start": start, "judged_from": judged, "end": end}
    return procs, shm, failures


def plot(samples: list[dict], span: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(3, 1, figsize=(11, 10), sharex=True, gridspec_kw={"height_ratios": [3, 1, 1]})
    labels = sorted({k for s in samples for k in s["procs"]}, key=lambda k: (k != "launcher", k))
    for i, label in enumerate(labels):
        pts = [(s["t"], s["procs"][label]) for s in samples if label in s["procs"]]
        t = [p[0] for p in pts]
        color = f"C{i % 10}"
        ax[0].plot(t, [p[1]["uss"] / MB for p in pts], "-", color=color, lw=1, label=f"{label} USS")
        ax[0].plot(t, [p[1]["pss"] / MB for p in pts], "--", color=color, lw=1, label=f"{label} PSS")
        ax[1].step(t, [p[1]["fds"] for p in pts], where="post", color=color, lw=1, label=label)
    ax[2].step([s["t"] for s in samples], [s["shm_bytes"] / MB for s in samples], where="post", color="k", lw=1)
    for a in ax:
        a.axvspan(span["start"], span["judged_from"], color="0.9", zorder=0)
        a.axvline(span["end"], color="0.5", lw=0.8, ls=":")
        a.grid(alpha=0.3)
    ax[0].set_ylabel("MiB")
    ax[0].set_title("memory per process (USS solid, PSS dashed); grey: warm-up, not judged")
    ax[0].legend(fontsize=7, ncol=2, loc="upper left")
    ax[1].set_ylabel("open fds")
    ax[1].legend(fontsize=7, ncol=len(labels), loc="upper left")
    ax[2].set_ylabel("run's /dev/shm MiB")
    ax[2].set_xlabel("seconds since launch")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_memory_soak(args, extra: list[str]) -> int:
    out = Path(args.out or "soak-out")
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    argv, total, epoch_steps = settings(args, extra, run_dir, args.steps)
    progress(f"memory soak: {total} steps, {args.workers} workers, a sample every {args.interval:g} s into {out}")
    run = Run(argv, out / "launch.log")
    sampler = Sampler(run, run_dir)
    deadline, next_line, rc = run.t0 + args.timeout, run.t0 + 30, None
    try:
        while rc is None:
            s = sampler.sample()
            rc = run.wait(min(deadline, time.monotonic() + args.interval))
            if rc is None and time.monotonic() >= deadline:
                break
            if time.monotonic() >= next_line and not args.no_progress:
                mem = ", ".join(f"{k} {v['uss'] / MB:.0f}" for k, v in s["procs"].items())
                progress(f"step {s['steps']}/{total} at {s['t']:.0f} s; USS MiB: {mem}")
                next_line += 30
    finally:
        hung = run.alive()
        if hung:
            run.kill()
    wall = time.monotonic() - run.t0
    failures = [f"the run did not finish within --timeout {args.timeout:g} s (killed)"] if hung else []
    if rc not in (0, None):
        failures.append(f"launch exited {rc}: see {run.log_path}")
    summary, why = completion(run_dir, total)
    failures += why
    dropped = summary.get("dropped_messages")
    if dropped != 0:
        failures.append(f"the coordinator dropped {dropped} message(s)")
    procs, shm, bad = analyse(sampler.samples, total, args, epoch_steps)
    failures += bad
    left = leftovers([run.run_id], [run.pid])
    if left:
        failures.append(f"left behind: {', '.join(left[:4])}")
        remove_segments([run.run_id])
    span = shm.pop("span_s", {"start": 0, "judged_from": 0, "end": wall})
    report = {"steps_expected": total, "steps_done": summary.get("steps"), "rc": rc, "wall_s": round(wall, 1),
              "run_id": run.run_id, "dropped_messages": dropped, "processes": procs,
              "fds_constant": all(p["fds_constant"] for p in procs.values()) if procs else False, "shm": shm,
              "leftovers": left, "failures": failures, "passed": not failures, "span_s": span,
              "settings": {"workers": args.workers, "steps": args.steps, "interval_s": args.interval,
                           "warmup": args.warmup, "max_growth_pct": args.max_growth, "slack_mb": args.slack_mb,
                           "launch": argv},
              "samples": sampler.samples}
    (out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    if sampler.samples:
        plot(sampler.samples, span, out / "soak.png", f"dptrain soak: {total} steps, {args.workers} workers "
             f"({run.run_id})")
    print(format_report(report))
    return fail_lines(failures, f"memory soak ({out / 'soak.json'})")


def format_report(r: dict) -> str:
    lines = [f"{r['steps_done']}/{r['steps_expected']} steps in {r['wall_s']} s, dropped messages "
             f"{r['dropped_messages']}, shm {r['shm'].get('count_max')} segments / {r['shm'].get('mb_max')} MiB "
             f"constant: {r['shm'].get('constant')}, leftovers: {len(r['leftovers'])}",
             f"{'process':10s} {'USS MiB first→last':>22s} {'growth':>8s} {'PSS MiB first→last':>22s} {'growth':>8s}"
             f" {'fds':>9s} {'threads':>8s}"]
    for label, p in r["processes"].items():
        lines.append(f"{label:10s} {p['uss_mb_first']:>10.1f} → {p['uss_mb_last']:<9.1f} {p['uss_growth_pct']:>+7.2f}%"
                     f" {p['pss_mb_first']:>10.1f} → {p['pss_mb_last']:<9.1f} {p['pss_growth_pct']:>+7.2f}%"
                     f" {p['fds_min']:>4d}-{p['fds_max']:<4d} {p['threads_min']:>3d}-{p['threads_max']:<3d}")
    return "\n".join(lines)
