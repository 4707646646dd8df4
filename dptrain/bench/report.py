"""The benches' rows: the median round, paired ratios, scaling columns, the table, CSV/JSON/PNG outputs."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from ..distributed.session import physical_cores

CSV_KEYS = ["impl", "transport", "workers", "images_per_s", "speedup", "efficiency", "vs_torch", "of_ceiling", "step_s",
            "compute_s", "comm_s", "reduce_s", "update_s", "serial_s", "update_by", "coordinator_frac", "pss_total_mb",
            "pss_coordinator_mb", "pss_worker_mean_mb", "images_mb", "blas_threads", "threads"]


def print_rows(rows: list[dict], as_json: bool, table, files: list[Path]) -> None:
    """One JSON line per row on stdout, or the table and the files written."""
    if as_json:
        for r in rows:
            print(json.dumps(r), flush=True)
    else:
        print(table(rows), flush=True)
        print(f"\nwrote {', '.join(map(str, files))}", flush=True)


def median_row(runs: list[dict]) -> dict:
    """One N's rounds as one row: the median round's figures (an even count: the upper one) and every round's img/s
    in `images_per_s_rounds`, in round order."""
    if len(runs) == 1:
        return runs[0]
    ips = [r["images_per_s"] for r in runs]
    row = dict(sorted(runs, key=lambda r: r["images_per_s"])[len(runs) // 2])
    row.update(images_per_s=statistics.median(ips), images_per_s_rounds=ips, rounds=len(runs))
    return row


def paired_ratio(a: dict, b: dict) -> tuple[float, list[float] | None]:
    """a's img/s over b's. With rounds on both (median_row): the median of each round's own ratio, and those ratios
    (runs paired in time, so a drift between rounds cancels); else the plain ratio and None."""
    x, y = a.get("images_per_s_rounds"), b.get("images_per_s_rounds")
    if x and y and len(x) == len(y):
        ratios = [p / q for p, q in zip(x, y)]
        return statistics.median(ratios), ratios
    return a["images_per_s"] / b["images_per_s"], None


def add_scaling(rows: list[dict]) -> None:
    """speedup / efficiency against the smallest N of the same implementation and transport (with rounds: the
    median of each round's own ratio, so a drift between rounds cancels); dptrain vs torch."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["impl"], r["transport"]), []).append(r)
    for group in groups.values():
        base = min(group, key=lambda r: r["workers"])
        for r in group:
            _set_ratio(r, "speedup", base)
            r["efficiency"] = r["speedup"] * base["workers"] / r["workers"]
    for impl, key in (("torch-ddp", "vs_torch"), ("ceiling", "of_ceiling")):
        others = {r["workers"]: r for r in rows if r["impl"] == impl}
        for r in rows:
            if r["impl"] == "dptrain" and r["workers"] in others:  # against the same round's other run
                _set_ratio(r, key, others[r["workers"]])


def _set_ratio(r: dict, key: str, other: dict) -> None:
    """r[key] = paired_ratio(r, other), and r[key + "_rounds"] when there were rounds."""
    r[key], rounds = paired_ratio(r, other)
    if rounds is not None:
        r[f"{key}_rounds"] = rounds


def format_table(rows: list[dict]) -> str:
    head = (f"{'impl':<10}{'transport':<10}{'N':>3}{'img/s':>9}{'speedup':>9}{'eff':>6}{'vs torch':>9}"
            f"{'step ms':>9}{'compute':>9}{'comm':>8}{'reduce':>8}{'update':>8}{'serial':>8}{'ser%':>7}{'PSS MB':>9}"
            f"{'/worker':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = lambda k: f"{1e3 * r[k]:8.1f}" if k in r else f"{'':>8}"  # noqa: E731
        lines.append(
            f"{r['impl']:<10}{r['transport']:<10}{r['workers']:>3}{r['images_per_s']:9.1f}{r['speedup']:9.2f}"
            f"{r['efficiency']:6.2f}" + (f"{r['vs_torch']:9.2f}" if "vs_torch" in r else f"{'':>9}")
            + f"{1e3 * r['step_s'] if 'step_s' in r else r.get('step_ms', 0.0):9.1f}"
            + (f"{ms('compute_s')} {ms('comm_s')}{ms('reduce_s')}{ms('update_s')}{ms('serial_s')}"
               f"{100 * r.get('coordinator_frac', 0.0):6.1f}%{mb(r['pss_total_mb'])}{mb(r['pss_worker_mean_mb'])}"
               if "compute_s" in r else ""))
    for r in rows:
        if "images_per_s_rounds" in r:
            lines.append(f"{r['impl']} {r['transport']} N = {r['workers']}, {r['rounds']} rounds: img/s "
                         + " ".join(f"{v:.1f}" for v in r["images_per_s_rounds"])
                         + ("; speedup " + " ".join(f"{v:.2f}" for v in r["speedup_rounds"])
                            if "speedup_rounds" in r else "")
                         + ("; vs torch " + " ".join(f"{v:.2f}" for v in r["vs_torch_rounds"])
                            if "vs_torch_rounds" in r else "")
                         + ("; of ceiling " + " ".join(f"{v:.2f}" for v in r["of_ceiling_rounds"])
                            if "of_ceiling_rounds" in r else ""))
    for r in rows:
        if "of_ceiling" in r:
            lines.append(f"{r['impl']} {r['transport']} N = {r['workers']}: {r['of_ceiling']:.2f} of the ceiling "
                         f"(N processes computing their shards with nothing to exchange)")
    return "\n".join(lines)


def mb(v) -> str:
    return f"{'-':>9}" if v is None else f"{v:9.0f}"


def write_rows(rows: list[dict], csv_path: Path, keys: list[str]) -> None:
    """rows as CSV (the `keys` columns) and, beside it, as JSON (every field)."""
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    csv_path.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


def write_outputs(rows: list[dict], out: Path) -> None:
    write_rows(rows, out / "bench.csv", CSV_KEYS)
    plot_scaling(rows, out / "bench.png")


def plot_scaling(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(f"{r['impl']} ({r['transport']})", []).append(r)
    for label, g in groups.items():
        g = sorted(g, key=lambda r: r["workers"])
        ns = [r["workers"] for r in g]
        a1.plot(ns, [r["images_per_s"] for r in g], "o-", label=label)
        a2.plot(ns, [r["efficiency"] for r in g], "o-", label=label)
    cores = physical_cores()
    ns_all = sorted({r["workers"] for r in rows})
    ours = [r for r in rows if r["impl"] == "dptrain"]
    if ours:  # ideal: the smallest N's speed times min(N, cores) / min(N0, cores); N beyond the cores adds nothing
        base = min(ours, key=lambda r: r["workers"])
        per = base["images_per_s"] / min(base["workers"], cores)
        a1.plot(ns_all, [per * min(n, cores) for n in ns_all], ":", color="grey", label="ideal (min(N, cores))")
        a2.plot(ns_all, [min(n, cores) / n * min(base["workers"], cores) / base["workers"] for n in ns_all], ":",
                color="grey", label="ideal")
    for ax in (a1, a2):
        ax.axvline(cores, color="grey", alpha=0.5, lw=1)
        ax.annotate(f"{cores} cores", (cores, 0), xycoords=("data", "axes fraction"), xytext=(3, 3),
                    textcoords="offset points", fontsize=8, color="grey")
    for ax, ylabel in ((a1, "images / s"), (a2, "efficiency (speed-up / N)")):
        ax.set_xlabel("workers N")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["workers"] for r in rows}), [str(n) for n in sorted({r["workers"] for r in rows})])
        ax.grid(alpha=0.3)
        ax.legend()
    a2.set_ylim(0, max(1.1, 1.1 * max(r["efficiency"] for r in rows)))  # above 1 on a loaded machine
    beyond = [n for n in ns_all if n > cores]
    fig.suptitle(f"dptrain bench ({cores} physical cores"
                 + (f"; N = {', '.join(map(str, beyond))} exceed them: workers share cores)" if beyond else ")"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
