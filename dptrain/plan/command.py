"""`dptrain plan`'s command line: flags, tables, the validation report (the model itself is model.py)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from .. import config as config_mod, install_hint, log
from ..flags import parse_overrides
from .calibration import compute_source
from .model import (
    AES_GCM_BYTES_PER_CPU_S,
    ONE_HOST,
    PLANE_DEFAULT,
    PLANES,
    WIRE_BYTES,
    CostModel,
    baseline,
    count_params,
    factor_shape,
    format_bandwidth,
    parse_bandwidth,
    parse_hosts,
    predict,
)
from .validate import plot_validation, validate

# ---------------------------------------------------------------------------------------------- command line

def parse_shared_cores(text: str | None) -> int | None:
    """--shared-cores N|off -> N or None."""
    if text is None or str(text).strip().lower() in ("off", "none", "no", "0"):
        return None
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"--shared-cores wants a number of cores or off, got {text!r}") from None
    if n < 1:
        raise ValueError(f"--shared-cores wants a number of cores >= 1 or off, got {text!r}")
    return n


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hosts", help="comma list of host counts, e.g. 1,16,64")
    p.add_argument("--slots", type=int, help="worker slots (cores) per host")
    p.add_argument("--bandwidth", help="link rate per host and direction, bits/s: 10gbit, 25gbit,1gbit, 1e9")
    p.add_argument("--plane", default=PLANE_DEFAULT,
                   help="star, mesh and/or ddp (comma list); one host (--hosts 1): workers (dist.update = workers, "
                        "the default) and coordinator (the coordinator sums and updates alone)")
    p.add_argument("--wire-dtype", choices=list(WIRE_BYTES), default=None, help="(default: dist.wire_dtype)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: train.batch_size)")
    p.add_argument("--image-size", type=int, default=None, help="(default: data.image_size)")
    p.add_argument("--classes", type=int, default=62)
    p.add_argument("--config", default=None, help="TOML file whose [model]/[data] the plan uses")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compute-ms-per-image", type=float, default=None,
                   help="forward+backward ms per image on one core (default: the calibration cache)")
    g.add_argument("--calibrate", action="store_true", help="time the model here now (a few s) and save it")
    p.add_argument("--compute-ms-per-step", type=float, default=0.0,
                   help="with --compute-ms-per-image: the per-step part that does not grow with the batch")
    d = CostModel(1.0)
    p.add_argument("--shared-cores", default=None, metavar="N|off",
                   help="all hosts on one box of N cores (every worker and every host's communication share them), "
                        "as dptrain bench --hosts runs them (default: off, separate hosts; with --validate: this "
                        "machine's cores)")
    p.add_argument("--latency-us", type=float, default=d.latency_s * 1e6, help="per-message latency α")
    p.add_argument("--link-efficiency", type=float, default=d.link_efficiency, help="payload / line rate")
    p.add_argument("--update-ns-per-param", type=float, default=d.update_ns_per_param,
                   help="clip + momentum SGD per parameter, one core")
    p.add_argument("--mem-gb-per-s", type=float, default=d.mem_bytes_per_s / 1e9,
                   help="a host summing its S gradients in shared memory")
    p.add_argument("--coord-link-ratio", type=float, default=d.coord_link_ratio,
                   help="the coordinator's link bandwidth / a host's")
    p.add_argument("--curve-gb-per-cpu-s", type=float, default=d.curve_bytes_per_cpu_s / 1e9,
                   help="GB of wire bytes sealed + opened with CURVE per CPU-second (star, mesh; 0: plain links)")
    p.add_argument("--aes-gcm-gb-per-cpu-s", type=float, default=AES_GCM_BYTES_PER_CPU_S / 1e9,
                   help="GB sealed + opened with AES-256-GCM per CPU-second on the mesh's sockets, used when "
                        "dist.bulk_cipher = aes-gcm (--dist.bulk_cipher=aes-gcm)")
    p.add_argument("--gemm-gflops", type=float, default=None,
                   help="one core's float32 GEMM GFLOP/s on the factored Linear's dW = X^T dY (default: the "
                        f"calibration's, or {d.gemm_flops_per_s / 1e9:g} with --compute-ms-per-image)")
    p.add_argument("--f16-encode-ns", type=float, default=d.f16_encode_ns, help="float16 encode per element")
    p.add_argument("--f16-decode-ns", type=float, default=d.f16_decode_ns, help="float16 decode per element")
    p.add_argument("--overlap", type=float, default=d.overlap,
                   help="fraction of compute that hides mesh's local sum and reduce-scatter")
    p.add_argument("--overlap-ddp", type=float, default=d.overlap_ddp,
                   help="fraction of the per-image compute that hides DDP's all-reduce (default: 0.3, as measured "
                        "on the one-box bench at global batch 96; up to ~0.67 on separate hosts)")
    p.add_argument("--validate", metavar="FILE", nargs="+", default=None,
                   help="JSON lists of measured rows (dptrain bench --hosts): measured vs predicted")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="with --validate: measured (markers) vs predicted (lines) step time against H")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def read_rows(path: Path) -> list:
    """A JSON list (bench-hosts.json) or one JSON object per line (`dptrain bench --hosts --json`)."""
    text = path.read_text()
    try:
        return json.loads(text)
    except ValueError:
        try:
            return [json.loads(ln) for ln in text.splitlines() if ln.strip()]
        except ValueError:
            raise ValueError("neither a JSON list nor JSON lines") from None


def file_labels(paths: list) -> list[str]:
    """Short names for the rows of several files: the file's stem, with its folder where stems repeat; "" for one
    file."""
    if len(paths) < 2:
        return [""] * len(paths)
    stems = [Path(p).stem for p in paths]
    return [f"{Path(p).parent.name}/{s}" if stems.count(s) > 1 else s for p, s in zip(paths, stems)]


def _config(args, extra: list[str], more: dict[str, str] | None = None) -> config_mod.Config:
    overrides = {**parse_overrides(extra), **(more or {})}
    if args.image_size is not None:
        overrides.setdefault("data.image_size", str(args.image_size))
    if args.batch_size is not None:
        overrides.setdefault("train.batch_size", str(args.batch_size))
    if args.wire_dtype is not None:
        overrides.setdefault("dist.wire_dtype", args.wire_dtype)
    try:
        return config_mod.load(args.config, overrides)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"dptrain plan: config error: {e}") from None


def _ms(s: float) -> str:
    return f"{1e3 * s:9.1f}"


def format_table(rows: list[dict]) -> str:
    w = max([6] + [len(r["plane"]) + 1 for r in rows])
    head = (f"{'plane':<{w}}{'link':>8}{'hosts':>6}{'H×S':>6}{'b':>5}{'compute':>9}{'local':>9}{'comm':>9}"
            f"{'exposed':>9}{'dW':>7}{'update':>9}{'step ms':>9}{'img/s':>9}{'eff':>6}{'host MB':>9}{'coord MB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        coord = r["coord_in_bytes"] / 1e6
        flags = ((" W-replicated" if r.get("replicated") else "") + (" coord-bound" if r["coord_bound"] else "")
                 + (" cpu-bound" if r["cpu_bound"] else ""))
        dw = f"{1e3 * r['factor_gemm_s']:7.1f}" if r.get("factored") else f"{'-':>7}"
        lines.append(
            f"{r['plane']:<{w}}{format_bandwidth(r['bandwidth_bps']) if r['bandwidth_bps'] else '-':>8}"
            f"{r['hosts']:>6}{r['workers']:>6}"
            f"{r['per_worker_batch']:>5}{_ms(r['compute_s'])}{_ms(r['local_reduce_s'])}{_ms(r['comm_s'])}"
            f"{_ms(r['comm_exposed_s'])}{dw}{_ms(r['update_s'])}{_ms(r['step_s'])}{r['images_per_s']:9.1f}"
            f"{r['efficiency']:6.2f}{r['host_send_bytes'] / 1e6:9.1f}{coord:9.1f}" + flags)
    return "\n".join(lines)


def format_validation(v: dict) -> str:
    files = any(r.get("file") for r in v["rows"])
    fw = max([len(r.get("file") or "") for r in v["rows"]] + [4]) + 1 if files else 0
    head = ((f"{'file':<{fw}}" if files else "") + f"{'plane':<6}{'wire':>8}{'link':>8}{'H':>4}{'S':>4}{'B':>6} |"
            f"{'step ms':>9}{'pred':>9}{'err':>6} |{'comm ms':>9}{'pred':>9}{'err':>6} |{'host MB':>8}{'pred':>7} |"
            f"{'coord MB':>9}{'pred':>7}")
    lines = [head, "-" * len(head)]
    pct = lambda e: f"{100 * e:+5.0f}%" if e is not None else f"{'':>6}"  # noqa: E731
    mb = lambda r, k: f"{r[k]:{8 if k == 'host_out_mb' else 9}.1f}{r['pred_' + k]:7.1f}" if k in r else (  # noqa: E731
        " " * (15 if k == "host_out_mb" else 16))
    for r in v["rows"]:
        comm = f"{_ms(r['comm_s'])}{_ms(r['pred_comm_s'])}{pct(r['comm_err'])}" if "comm_s" in r else " " * 24
        lines.append((f"{r.get('file') or '':<{fw}}" if files else "")
                     + f"{r['plane']:<6}{r['wire_dtype']:>8}{format_bandwidth(r['bandwidth_bps']):>8}{r['hosts']:>4}"
                     f"{r['slots']:>4}{r['batch_size']:>6} |{_ms(r['step_s'])}{_ms(r['pred_step_s'])}"
                     f"{pct(r['step_err'])} |{comm} |{mb(r, 'host_out_mb')} |{mb(r, 'coord_in_mb')}")
    for s in v["skipped"]:
        lines.append(f"{s.get('file') + ' ' if s.get('file') else ''}row {s['row']} skipped: {s['reason']}")
    if v["mean_abs_step_err"] is not None:
        lines.append(f"mean |step error| {100 * v['mean_abs_step_err']:.0f}% over {len(v['rows'])} row(s)"
                     + "".join(f"; {src or 'rows'}: mean {100 * s['mean_abs_step_err']:.1f}%, max "
                               f"{100 * s['max_abs_step_err']:.1f}% ({s['rows']})"
                               for src, s in v.get("by_source", {}).items()))
        lines.append("comm: the measured exposed communication (DDP: step minus its no_sync step; dptrain: the "
                     "coordinator's round minus the slowest host's summed busy phases, which on the mesh count the "
                     "scatter that overlaps backward as busy, so no error is given for it) against the predicted "
                     "exposed communication; host MB: sent by an agent host per step; coord MB: into the "
                     "coordinator per step")
    rates = [r["wire_bytes_per_io_cpu_s"] for r in v["rows"] if r.get("wire_bytes_per_io_cpu_s")]
    if rates:
        lines.append(f"crypto: {len(rates)} dptrain row(s) measured their wire's CPU (the ZeroMQ I/O threads, user "
                     f"mode: CURVE with ZeroMQ's copies): {min(rates) / 1e9:.2f}-{max(rates) / 1e9:.2f} GB sealed + "
                     "opened per CPU-second (the plan's --curve-gb-per-cpu-s also counts the copies outside those "
                     "threads, at both ends)")
    return "\n".join(lines)


def main(args: argparse.Namespace, extra: list[str]) -> int:
    cfg = _config(args, extra)
    err = lambda msg: SystemExit(f"dptrain plan: {msg}")  # noqa: E731
    if args.validate is None and (args.hosts is None or args.slots is None):
        raise err("--hosts and --slots are required (and --bandwidth across hosts), or --validate FILE...")
    if args.plot is not None and args.validate is None:
        raise err("--plot draws a validation: give --validate FILE...")
    try:
        hosts = parse_hosts(args.hosts) if args.hosts is not None else []
        rates = [parse_bandwidth(b) for b in args.bandwidth.split(",") if b.strip()] if args.bandwidth else []
        planes = [p.strip() for p in args.plane.split(",") if p.strip()]
        if not planes or any(p not in PLANES + ONE_HOST for p in planes):
            raise ValueError(f"--plane wants star, mesh, ddp, workers and/or coordinator, got {args.plane!r}")
        if args.slots is not None and args.slots < 1:
            raise ValueError("--slots must be >= 1")
        if args.classes < 1:
            raise ValueError("--classes must be >= 1")
        if args.shared_cores is None and args.validate is not None:
            shared = os.cpu_count() or 1  # dptrain bench --hosts runs every host on this box
        else:
            shared = parse_shared_cores(args.shared_cores)
        num_params = count_params(cfg, args.classes)
    except ValueError as e:
        raise err(e) from None
    fixed, per_image, source, more = compute_source(args, cfg, args.classes)
    if args.gemm_gflops is not None:
        more["gemm_flops_per_s"] = args.gemm_gflops * 1e9
    gemm = {"gemm_flops_per_s": more["gemm_flops_per_s"]} if more["gemm_flops_per_s"] is not None else {}
    try:
        model = CostModel(ms_per_image=per_image, ms_per_step=fixed, latency_s=args.latency_us * 1e-6,
                          ms_per_step_factored=more["ms_per_step_factored"],
                          ms_per_image_factored=more["ms_per_image_factored"], **gemm,
                          ddp_ms_per_step=more["ddp_ms_per_step"], ddp_ms_per_image=more["ddp_ms_per_image"],
                          link_efficiency=args.link_efficiency, update_ns_per_param=args.update_ns_per_param,
                          mem_bytes_per_s=args.mem_gb_per_s * 1e9, coord_link_ratio=args.coord_link_ratio,
                          curve_bytes_per_cpu_s=args.curve_gb_per_cpu_s * 1e9 if args.curve_gb_per_cpu_s else None,
                          aes_gcm_bytes_per_cpu_s=args.aes_gcm_gb_per_cpu_s * 1e9
                          if cfg.dist.bulk_cipher == "aes-gcm" and args.aes_gcm_gb_per_cpu_s else None,
                          f16_encode_ns=args.f16_encode_ns, f16_decode_ns=args.f16_decode_ns,
                          overlap=args.overlap, overlap_ddp=args.overlap_ddp, shared_cores=shared,
                          cipher_threads=cfg.dist.cipher_threads,
                          overlap_forward=CostModel.overlap_forward if cfg.dist.gather_overlap else 0.0)
    except ValueError as e:
        raise err(e) from None
    wire = cfg.dist.wire_dtype
    batch = cfg.train.batch_size
    sync_every = cfg.dist.sync_every
    info = {"num_params": num_params, "model": dataclasses.asdict(cfg.model), "image_size": cfg.data.image_size,
            "classes": args.classes, "compute_source": source, "cost_model": dataclasses.asdict(model),
            "sync_every": sync_every}
    cores = (f"one box: every host's workers and communication share {shared} core(s)" if shared else
             "separate hosts, each with its own cores")
    if args.validate is not None:
        def params_for(overrides: dict) -> int:  # a row measured with other model / image keys
            try:
                return count_params(_config(args, extra, overrides), args.classes)
            except SystemExit as e:
                raise ValueError(f"its overrides {overrides}: {e}") from None
        sources = []
        for f, label in zip(args.validate, file_labels(args.validate)):
            try:
                sources.append((label, read_rows(Path(f))))
            except (OSError, ValueError) as e:
                raise err(f"{f}: {e}") from None
        try:
            v = validate(sources, num_params, model, rates[0] if rates else None, params_for, sync_every)
        except (OSError, ValueError) as e:
            raise err(f"{' '.join(args.validate)}: {e}") from None
        if args.plot is not None and v["rows"]:
            try:
                where = plot_validation(v, args.plot, f"dptrain bench --hosts: measured (markers) vs dptrain plan "
                                                      f"(lines)\n{cores}")
            except ImportError:
                raise err(f"--plot needs matplotlib: {install_hint('plot')}") from None
            log.get().info(f"wrote {where}")
        if args.json:
            print(json.dumps({**info, **v}), flush=True)
        else:
            print(f"model: {num_params:,} params; compute {fixed:.1f} ms/step + {per_image:.2f} ms/image per "
                  f"worker ({source}); {cores}\n", flush=True)
            print(format_validation(v), flush=True)
        return 0 if v["rows"] else 1
    if 1 in hosts and args.plane == PLANE_DEFAULT:  # one host: the workers' update against the coordinator's
        planes = planes + list(ONE_HOST)
    if not rates:  # no --bandwidth: one host's planes only (launch --workers S: no link to size)
        asked_network = args.plane != PLANE_DEFAULT and any(p not in ONE_HOST for p in planes)
        if set(hosts) != {1} or asked_network:
            raise err("--bandwidth is required across hosts (and for the star, mesh and ddp planes)")
        rates, planes = [None], [p for p in planes if p in ONE_HOST]
    factored = factor_shape(cfg, args.classes) if cfg.dist.factored else None
    # one host factors only with its gradients in shared memory and not --batch-invariant (reduce.one_host_factored)
    local_ok = cfg.dist.transport == "shm" and not cfg.train.batch_invariant_block
    rows = [predict(plane, h, args.slots, batch, bps, WIRE_BYTES[wire], num_params, model, sync_every,
                    factored if plane not in ONE_HOST or local_ok else None, cfg.dist.factor_update)
            for bps in rates for plane in planes for h in hosts if plane not in ONE_HOST or h == 1]
    base = baseline(args.slots, batch, num_params, model, factored)
    ddp_base = baseline(args.slots, batch, num_params, model, ddp=True)
    if args.json:
        print(json.dumps({**info, "wire_dtype": wire, "batch": batch, "slots": args.slots, "baseline": base,
                          "rows": rows}), flush=True)
        return 0
    idle = [r["hosts"] for r in rows if r["idle_workers"]]
    curve = (f"CURVE {model.curve_bytes_per_cpu_s / 1e9:g} GB per CPU-s" if model.curve_bytes_per_cpu_s
             else "plain links (no CURVE)")
    if model.aes_gcm_bytes_per_cpu_s and model.curve_bytes_per_cpu_s:
        threads = f"{model.cipher_threads} thread(s)" if model.cipher_threads else "min(4, slots) threads"
        curve += f" (the mesh's sockets AES-256-GCM {model.aes_gcm_bytes_per_cpu_s / 1e9:g}, {threads} a host)"
    print(f"model: {num_params:,} params, {cfg.data.image_size}x{cfg.data.image_size}, {args.classes} classes; "
          f"M = {num_params * WIRE_BYTES[wire] / 1e6:.1f} MB per step on the wire ({wire})\n"
          f"compute: {fixed:.1f} ms/step + {per_image:.2f} ms/image per worker ({source})\n"
          f"{cores}; dW GEMM {model.gemm_flops_per_s / 1e9:.0f} GFLOP/s a core, the factored Linear's update "
          f"{cfg.dist.factor_update} (dist.factor_update); update {model.update_ns_per_param:g} ns/param, latency {model.latency_s * 1e6:g} us, link "
          f"efficiency {model.link_efficiency:g}, local sum {model.mem_bytes_per_s / 1e9:g} GB/s, {curve}, float16 "
          f"{model.f16_encode_ns:g}/{model.f16_decode_ns:g} ns per element, overlap {model.overlap:g} (ddp "
          f"{model.overlap if model.overlap_ddp is None else model.overlap_ddp:g}), sync every {sync_every} steps"
          + (f", coordinator link ×{model.coord_link_ratio:g}" if model.coord_link_ratio != 1 else "") + "\n"
          f"global batch {batch}, {args.slots} slot(s) per host; efficiency against 1 host alone, no network: "
          f"b={base['per_worker_batch']}, {1e3 * base['step_s']:.1f} ms/step, {base['images_per_s']:.1f} img/s"
          + (f" (ddp: one host of its ranks, {1e3 * ddp_base['step_s']:.1f} ms/step)"
             if "ddp" in planes and model.ddp_ms_per_image is not None else "") + "\n"
          "ms per step; comm includes the wire's cipher (CURVE, AES-GCM) and float16 work on the hosts' CPUs; dW = "
          "the factored Linear's weight gradient from its factors (- where not factored), W-replicated = every host "
          "computes all of it and updates the layer itself; host MB = bytes a host sends per step (it receives about "
          "as many); coord MB = into the coordinator per step\n", flush=True)
    print(format_table(rows), flush=True)
    if idle:
        print(f"\nnote: global batch {batch} < workers for {sorted(set(idle))} host(s): some workers get no images",
              flush=True)
    return 0
