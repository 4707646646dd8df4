"""`dptrain plan --validate`: measured rows (dptrain bench --hosts) against the cost model, and their plot."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from .. import config as config_mod
from .model import AES_GCM_BYTES_PER_CPU_S, WIRE_BYTES, CostModel, format_bandwidth, parse_bandwidth, predict

# ---------------------------------------------------------------------------------------------- validation

_TC_BYTES = {"bps": 8.0, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}


def parse_tc_rate(rate) -> float | None:
    """A measured row's link rate as tc wrote it: like parse_bandwidth, but `mbps` is tc's megabytes per second and
    off / none / 0 / null mean an unshaped link (None)."""
    if rate is None or (isinstance(rate, str) and rate.strip().lower() in ("", "off", "none", "0")) or rate == 0:
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kmg]?bps)", str(rate).strip().lower())
    return float(m[1]) * _TC_BYTES[m[2]] if m else parse_bandwidth(rate)


def _overrides(text) -> dict[str, str]:
    """`--dist.plane=star --model.widths=[8,16]` (a string or a list, as bench-hosts rows keep them) -> dict."""
    items = text.split() if isinstance(text, str) else list(text or [])
    pairs = (o[2:].split("=", 1) if "=" in o else (o[2:], "") for o in items
             if isinstance(o, str) and o.startswith("--"))
    return {k.replace("-", "_"): v for k, v in pairs}  # the key's dashes only: a value keeps its own (aes-gcm)


def measured_rows(raw) -> tuple[list[dict], list[dict]]:
    """(flat rows, skipped) from a list of measured rows. A flat row has hosts, slots, rate, wire_dtype, plane,
    batch_size, step_s, comm_s (+ optional compute_s, host_out_mb, host_in_mb, coord_in_mb, coord_out_mb,
    sync_every, factored: (K, F), factor_update, bulk_cipher). A row of `dptrain bench --hosts` (dptrain_step_s, ddp_step_s, h1_in_mb, ..., overrides) becomes a
    dptrain row (plane, wire and dist.sync_every from its overrides) and, when DDP ran, a ddp row. Unknown keys are
    ignored."""
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise ValueError("expected a JSON list of objects (rows of dptrain bench --hosts)")
    flat, skipped = [], []
    for i, r in enumerate(raw):
        ov = _overrides(r.get("overrides"))
        model_ov = {k: v for k, v in ov.items() if k.startswith(("model.", "data."))}
        if "step_s" in r or not any(k in r for k in ("dptrain_step_s", "ddp_step_s", "error")):
            flat.append({**r, "row": i, "overrides": model_ov})
            continue
        if r.get("error"):
            skipped.append({"row": i, "reason": f"the bench failed: {r['error']}"})
            continue
        common = {k: r.get(k) for k in ("hosts", "slots", "rate", "batch_size")}
        common["overrides"] = model_ov
        if r.get("dptrain_step_s") is not None:
            flat.append({**common, "row": i, "source": "dptrain",
                         "plane": r.get("plane") or ov.get("dist.plane") or config_mod.DistConfig().plane,
                         "wire_dtype": r.get("wire_dtype") or ov.get("dist.wire_dtype") or "float32",
                         "sync_every": ov.get("dist.sync_every"), "factored": r.get("factored"),
                         # rows record what the run resolved; older ones only their overrides, over the defaults
                         # of their day: CURVE on every link, the factored Linear updated by its rows' owners
                         "bulk_cipher": r.get("bulk_cipher") or ov.get("dist.bulk_cipher") or "curve",
                         "factor_update": r.get("factor_update") or ov.get("dist.factor_update") or "owners",
                         "step_s": r["dptrain_step_s"], "comm_s": r.get("dptrain_comm_s"),
                         "compute_s": r.get("dptrain_compute_s"), "host_out_mb": r.get("h2_out_mb"),
                         "host_in_mb": r.get("h2_in_mb"), "coord_in_mb": r.get("h1_in_mb"),
                         "coord_out_mb": r.get("h1_out_mb"), "wire_cpu_s": r.get("wire_cpu_s")})
        if r.get("ddp_step_s") is not None:
            flat.append({**common, "row": i, "source": "ddp", "plane": "ddp", "wire_dtype": "float32",
                         "step_s": r["ddp_step_s"], "comm_s": r.get("ddp_comm_s"),
                         "host_out_mb": r.get("ddp_h2_out_mb"), "host_in_mb": r.get("ddp_h2_in_mb")})
    return flat, skipped


def predict_row(row: dict, num_params: int, model: CostModel, default_bps: float | None,
                sync_every: int = 10) -> dict:
    """Prediction for one flat measured row (see measured_rows) against its measurements."""
    missing = [k for k in ("hosts", "slots", "plane", "batch_size", "step_s") if row.get(k) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    bps = parse_tc_rate(row.get("rate"))
    if bps is None:
        bps = default_bps
        if bps is None:
            raise ValueError(f"link not shaped (rate {row.get('rate')!r}) and no --bandwidth to assume")
    wire = row.get("wire_dtype") or "float32"
    if wire not in WIRE_BYTES:
        raise ValueError(f"wire_dtype {wire!r}")
    if (row.get("bulk_cipher") or "curve") == "aes-gcm":  # the row's mesh sockets were AES-GCM, not CURVE
        model = dataclasses.replace(model, aes_gcm_bytes_per_cpu_s=model.aes_gcm_bytes_per_cpu_s or AES_GCM_BYTES_PER_CPU_S)
    else:
        model = dataclasses.replace(model, aes_gcm_bytes_per_cpu_s=None)
    p = predict(row["plane"], int(row["hosts"]), int(row["slots"]), int(row["batch_size"]), bps, WIRE_BYTES[wire],
                int(row.get("num_params") or num_params), model, int(row.get("sync_every") or sync_every),
                tuple(row["factored"]) if row.get("factored") else None,  # rows from before factors: none
                row.get("factor_update") or "owners")  # rows from before dist.factor_update: the owners
    step = float(row["step_s"])
    out = {"file": row.get("file", ""), "row": row.get("row"), "source": row.get("source", ""), "hosts": p["hosts"],
           "slots": p["slots"], "plane": p["plane"], "wire_dtype": wire, "bandwidth_bps": bps,
           "batch_size": p["batch"], "num_params": p["num_params"], "step_s": step, "pred_step_s": p["step_s"],
           "step_err": p["step_s"] / step - 1 if step > 0 else None, "pred_compute_s": p["compute_s"],
           "pred_cpu_s": p["cpu_s"], "factored": p["factored"], "replicated": p["replicated"]}
    if row.get("comm_s") is not None:
        out.update(comm_s=float(row["comm_s"]), pred_comm_s=p["comm_exposed_s"])
        out["comm_err"] = p["comm_exposed_s"] / out["comm_s"] - 1 if out["comm_s"] > 0 else None
        if out["source"] == "dptrain" and out["plane"] == "mesh":  # see format_validation: not the same quantity
            out["comm_err"] = None
    if row.get("compute_s") is not None:  # the rest of the model on top of the measured compute
        out["compute_s"] = float(row["compute_s"])
        out["pred_step_given_compute_s"] = p["step_s"] - p["compute_s"] + out["compute_s"]
    aes = (row.get("bulk_cipher") or "curve") == "aes-gcm"  # AES-GCM seals in the agents' threads, not ZeroMQ's
    if row.get("wire_cpu_s") is not None and not aes:  # measured: the ZeroMQ I/O threads' user CPU (bench --hosts)
        out["wire_cpu_s"] = float(row["wire_cpu_s"])
        moved = [row.get(k) for k in ("host_out_mb", "host_in_mb", "coord_in_mb", "coord_out_mb")]
        if all(m is not None for m in moved) and out["wire_cpu_s"] > 0:  # every agent moves what h2 moves
            sealed = (p["hosts"] * (moved[0] + moved[1]) + moved[2] + moved[3]) * 1e6
            out["wire_bytes_per_io_cpu_s"] = sealed / out["wire_cpu_s"]
    for k, pk in (("host_out_mb", "host_send_bytes"), ("host_in_mb", "host_recv_bytes"),
                  ("coord_in_mb", "coord_in_bytes"), ("coord_out_mb", "coord_out_bytes")):
        if row.get(k) is not None:
            out[k], out[f"pred_{k}"] = float(row[k]), p[pk] / 1e6
    return out


def _error_summary(rows: list[dict]) -> dict | None:
    errs = [abs(r["step_err"]) for r in rows if r["step_err"] is not None]
    return {"rows": len(errs), "mean_abs_step_err": sum(errs) / len(errs), "max_abs_step_err": max(errs)} if errs \
        else None


def validate(raw, num_params: int, model: CostModel, default_bps: float | None, params_for=None,
             sync_every: int = 10) -> dict:
    """Measured against predicted, per row. `raw`: a list of measured rows, or a list of (label, rows) pairs (one
    per file; each row is tagged with its label). `params_for(overrides)`: the parameter count of a row whose
    model.* / data.* overrides differ from the plan's (None: num_params for every row)."""
    sources = raw if isinstance(raw, list) and raw and all(isinstance(s, tuple) for s in raw) else [("", raw)]
    out, skipped = [], []
    for label, rows in sources:
        flat, skip = measured_rows(rows)
        skipped += [{**s, "file": label} for s in skip]
        for r in flat:
            try:
                n = params_for(r["overrides"]) if params_for and r.get("overrides") else num_params
                out.append(predict_row({**r, "file": label}, n, model, default_bps, sync_every))
            except (ValueError, TypeError, KeyError) as e:
                skipped.append({"file": label, "row": r.get("row"), "reason": str(e)})
    skipped.sort(key=lambda s: (s["file"], s["row"] is None, s["row"]))
    summary = {src: _error_summary([r for r in out if r["source"] == src]) for src in sorted({r["source"] for r in out})}
    whole = _error_summary(out)
    return {"rows": out, "skipped": skipped, "mean_abs_step_err": whole["mean_abs_step_err"] if whole else None,
            "by_source": {k: v for k, v in summary.items() if v}}


def plot_validation(v: dict, path: str | Path, title: str = "") -> Path:
    """Measured step time (markers) and predicted (lines; a bar where a series has one host count) against H, one
    panel per link rate; a series per plane, wire dtype, global batch and slots per host (rows of different batches
    are not one curve). Needs matplotlib (the `plot` extra)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = v["rows"]
    if not rows:
        raise ValueError("no rows to plot")
    rates = sorted({r["bandwidth_bps"] for r in rows}, reverse=True)
    def key(r: dict) -> tuple:
        return r["plane"], r["wire_dtype"], r.get("batch_size") or 0, r.get("slots") or 1
    series = sorted({key(r) for r in rows}, key=lambda s: (s[0] == "ddp", s))
    style = {s: (f"C{i % 10}", "o^sDvP<>"[i % 8]) for i, s in enumerate(series)}
    fig, axes = plt.subplots(1, len(rates), figsize=(5.5 * len(rates), 6.0), squeeze=False, sharey=False)
    for ax, bps in zip(axes[0], rates):
        for s in series:
            pts = sorted((r for r in rows if r["bandwidth_bps"] == bps and key(r) == s), key=lambda r: r["hosts"])
            if not pts:
                continue
            color, marker = style[s]
            name = f"{'DDP gloo' if s[0] == 'ddp' else 'dptrain ' + s[0]} {s[1] if s[0] != 'ddp' else ''}".strip()
            name += f", B {s[2]}" + (f", {s[3]} slots" if s[3] > 1 else "")
            ax.plot([r["hosts"] for r in pts], [1e3 * r["step_s"] for r in pts], marker, color=color, ms=7,
                    mfc="none" if s[0] == "ddp" else color, ls="none", label=f"{name}")
            pred = sorted({(r["hosts"], r["pred_step_s"]) for r in pts})
            ax.plot([h for h, _ in pred], [1e3 * p for _, p in pred], "--" if s[0] == "ddp" else "-", color=color,
                    lw=1.5, marker="_" if len(pred) == 1 else None, ms=18)
        ax.set_title(f"{format_bandwidth(bps)}/s links")
        ax.set_xlabel("hosts H")
        ax.set_ylabel("step (ms)")
        ax.set_xticks(sorted({r["hosts"] for r in rows}))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2,
                  title="markers measured, lines predicted", title_fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
