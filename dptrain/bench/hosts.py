"""`dptrain bench --hosts 2,3,4 --rate 1gbit`: dptrain across hosts and PyTorch DDP on the same shaped links.

For each H, launch/netns-cluster.sh brings up H+1 "hosts" on this machine (network namespaces, each with its own
address, sshd and veth to one bridge) and shapes every link, h1's included, to --rate in both directions with the
script's `netem HOST --rate` (tbf). Then, on the same namespaces and links:
  dptrain   h1 is the head node: `dptrain launch --hostfile (h2..h(H+1), --slots each) --bind <h1>` runs inside
            h1's namespace, so the coordinator's traffic crosses h1's link like a real head node's; it starts one
            agent per host over ssh. Synthetic face set (bench_dist.synth_dataset), --warmup + --steps steps.
  DDP       PyTorch DDP (gloo): --slots ranks on each of h2..h(H+1) (`ip netns exec`, `python -m dptrain.bench.ddp
            --rank R --world W --master <h2>:PORT`), GLOO_SOCKET_IFNAME=eth0, the same model and global batch split
            over the W ranks (synthetic tensors). Skipped with a message when torch is not importable (or --no-ddp).
Both use T threads per process: --dist.blas_threads if given, else cores // (H x slots), at least 1.

Reported per H (one row; bench-hosts.json / bench-hosts.csv in --out; MB = 10^6 bytes):
  step ms   dptrain: mean step_s of the timed step records of metrics.jsonl (the warm-up records excluded);
            DDP: rank 0's time between barriers around the timed steps, per step.
  comm ms   dptrain: the coordinator's round minus the slowest host's compute, mean over the timed steps (the run's
            timeline; summary.json's "breakdown", which averages every step, is kept as dptrain_comm_all_s);
            DDP: the communication it did not hide = its step minus the same step under no_sync(), on rank 0.
  MB/step   bytes a host's link carried per timed step, "out" = sent by the host, "in" = received. dptrain: h1 (the
            coordinator) and h2 (an agent). This process polls metrics.jsonl every 2 ms and reads the counters of
            the host's veth in the root namespace (the peer of its eth0: rx there is eth0's tx) when the last warm-up
            step's record appears and when the last timed step's record appears, then divides by --steps. The run
            has one more (untimed) step after the timed ones, so both reads come the same few ms into a step and the
            window spans exactly --steps steps of traffic; start-up, preflight, checkpoints and shutdown are outside
            it. DDP: h2 (rank 0's host), rank 0 reads its eth0 counters (inside h2) around the timed steps.
  crypto s  dptrain: the wire's cryptography, CPU-seconds per timed step: the user-mode CPU time of every ZeroMQ
            I/O thread (ZMQbg/IO/n in /proc/PID/task/TID/stat) of the processes in each host's namespace, read at the
            same two marks (wire_cpu_coord_s: h1, wire_cpu_hosts_s: the agents, wire_cpu_s: both; their kernel time,
            TCP's copies, is wire_sys_s). CURVE's sealing and opening run there; so do ZeroMQ's framing copies.
            With dist.bulk_cipher = aes-gcm (the default) the agents seal and open on their own thread: they count
            that thread's CPU time (bulk.py) and metrics.jsonl carries the sum, read at the same marks (wire_aes_s,
            included in wire_cpu_hosts_s and wire_cpu_s).

Every subprocess runs in its own session under a hard timeout; on failure the command and the last lines of its log
are printed. The cluster is always torn down (finally, atexit, SIGTERM/SIGHUP), which kills whatever still runs in
its namespaces; a cluster left by a bench that was SIGKILLed is removed by the next one.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import sys
import time
import tomllib
from pathlib import Path

from .. import config as config_mod, install_hint, log
from ..config import load
from ..flags import TRAIN_FLAGS
from ..plan.model import factor_shape
from .netns_cluster import BenchError, Cluster, Job, cleanup_stale, down_all, io_cpu_s, terminate
from .report import print_rows, write_rows
from .workers import split_from_timeline, synth_dataset

DDP_PORT = 29500
POLL_S = 0.002
CSV_KEYS = ["hosts", "slots", "workers", "rate", "batch_size", "warmup", "steps", "threads", "overrides", "plane",
            "wire_dtype",
            "dptrain_step_s", "dptrain_images_per_s", "dptrain_comm_s", "dptrain_comm_all_s", "dptrain_compute_s",
            "h1_out_mb", "h1_in_mb", "h2_out_mb", "h2_in_mb", "wire_cpu_s", "wire_cpu_coord_s", "wire_cpu_hosts_s",
            "wire_sys_s", "ddp_step_s", "ddp_images_per_s", "ddp_nosync_s",
            "ddp_comm_s", "ddp_h2_out_mb", "ddp_h2_in_mb", "dptrain_vs_ddp", "error"]
_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}


# ---- pure helpers (unit-tested) ---------------------------------------------------------------------------------
def parse_hosts_list(text: str) -> list[int]:
    """"2,3,4" -> [2, 3, 4] (sorted, unique, each >= 1)."""
    try:
        hosts = sorted({int(h) for h in text.split(",") if h.strip()})
    except ValueError:
        raise ValueError(f"--hosts wants a comma list of host counts like 2,3,4, got {text!r}") from None
    if not hosts or hosts[0] < 1 or hosts[-1] > 64:
        raise ValueError(f"--hosts: host counts must be 1..64, got {text!r}")
    return hosts


def rate_bps(rate: str) -> float | None:
    """A tc rate ("1gbit", "100mbit", "10mbps") in bit/s; None for "off"/"none" (no shaping)."""
    if rate.lower() in ("off", "none", "0"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", rate.lower())
    if not m or (m.group(2) or "bit") not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"--rate wants a tc rate like 1gbit, 100mbit, 10mbps or off, got {rate!r}")
    return float(m.group(1)) * _UNITS[m.group(2) or "bit"]


def normalize_overrides(extra: list[str]) -> list[str]:
    """The extra arguments as `--section.key=value`, unchanged in meaning: `--dist.plane star` and launch's short
    flags (`--wire-dtype float16`, `--bn=sync`) are rewritten, unknown keys are passed on for launch to judge."""
    short = {flag: key for flag, key, *_ in TRAIN_FLAGS}
    out, i = [], 0
    while i < len(extra):
        name, eq, value = extra[i].partition("=")
        key = short.get(name) or (name[2:].replace("-", "_") if name.startswith("--") and "." in name else None)
        if key is None:
            raise ValueError(f"unknown argument {extra[i]!r} (config keys look like --dist.wire_dtype=float16)")
        if not eq:
            if i + 1 >= len(extra):
                raise ValueError(f"{name} needs a value")
            i += 1
            value = extra[i]
        out.append(f"--{key}={value}")
        i += 1
    return out


def override_dict(overrides: list[str]) -> dict[str, str]:
    return dict(o[2:].split("=", 1) for o in overrides)


def complete_records(buf: str) -> tuple[list[dict], str]:
    """The JSON records of the complete lines of `buf`, and the unfinished rest."""
    *lines, rest = buf.split("\n")
    return [json.loads(ln) for ln in lines if ln.strip()], rest


def per_step_mb(before: dict[str, int], after: dict[str, int], steps: int) -> dict[str, float]:
    """Counter deltas ({"out", "in"} bytes) -> MB per step."""
    return {k: (after[k] - before[k]) / steps / 1e6 for k in ("out", "in")}


def timed_step_s(records: list[dict], warmup: int, steps: int) -> list[float]:
    """step_s of the step records of steps warmup .. warmup + steps - 1 (epoch records have no step_s)."""
    return [r["step_s"] for r in records if "step_s" in r and warmup <= r["step"] < warmup + steps]


def wire_cpu(before: dict, after: dict, steps: int) -> dict[str, float]:
    """The wire's cryptography in CPU-seconds per step, from the ZeroMQ I/O threads (zmq_io_ticks of every host at
    the first and last mark). libzmq seals (encodes) and opens (decodes) CURVE on the I/O thread of the socket's
    context, with ZeroMQ's framing copies; their user-mode time is that work (libsodium runs in user mode), the
    kernel's TCP send/receive copies are their system time (kept apart: wire_sys_s). Coordinator = h1, hosts = the
    agents (h2..), each with its workers' contexts (loopback control messages: a few kB per step, no CURVE)."""
    cpu = {h: io_cpu_s(before.get(h, {}), t, steps) for h, t in after.items()}
    hosts = [v for h, v in cpu.items() if h != 1]
    coord = cpu.get(1, {"user": 0.0, "sys": 0.0})
    return {"wire_cpu_coord_s": coord["user"], "wire_cpu_hosts_s": sum(v["user"] for v in hosts),
            "wire_cpu_s": coord["user"] + sum(v["user"] for v in hosts),
            "wire_sys_s": coord["sys"] + sum(v["sys"] for v in hosts)}


def _mb(x: float | None) -> str:
    return f"{'-':>8}" if x is None else f"{x:8.1f}" if x >= 1 else f"{x:8.3g}"


def format_table(rows: list[dict]) -> str:
    def v(r, k, scale=1.0, w=8, p=1):
        return f"{r[k] * scale:{w}.{p}f}" if r.get(k) is not None else f"{'-':>{w}}"

    head1 = (f"{'':>3}{'':>4}{'':>8} |{'dptrain (coordinator on h1)':^65}|{'PyTorch DDP (gloo)':^40}|")
    head2 = (f"{'H':>3}{'W':>4}{'rate':>8} |{'step ms':>8}{'img/s':>8}{'comm ms':>8}{'h1 out':>8}{'h1 in':>8}"
             f"{'h2 out':>8}{'h2 in':>8}{'crypto s':>9}|{'step ms':>8}{'img/s':>8}{'comm ms':>8}{'h2 out':>8}{'h2 in':>8}|"
             f"{'vs DDP':>7}")
    lines = [head1, head2, "-" * len(head2)]
    for r in rows:
        lines.append(
            f"{r['hosts']:>3}{r['workers']:>4}{r['rate']:>8} |{v(r, 'dptrain_step_s', 1e3)}"
            f"{v(r, 'dptrain_images_per_s')}{v(r, 'dptrain_comm_s', 1e3)}{_mb(r.get('h1_out_mb'))}"
            f"{_mb(r.get('h1_in_mb'))}{_mb(r.get('h2_out_mb'))}{_mb(r.get('h2_in_mb'))}{v(r, 'wire_cpu_s', w=9, p=3)}|"
            f"{v(r, 'ddp_step_s', 1e3)}"
            f"{v(r, 'ddp_images_per_s')}{v(r, 'ddp_comm_s', 1e3)}{_mb(r.get('ddp_h2_out_mb'))}"
            f"{_mb(r.get('ddp_h2_in_mb'))}|{v(r, 'dptrain_vs_ddp', w=7, p=2)}"
            + (f"  error: {r['error']}" if r.get("error") else ""))
    settings = sorted({(r.get("plane"), r.get("wire_dtype"), r.get("batch_size"), r.get("warmup"), r.get("steps"),
                        r.get("threads")) for r in rows if r.get("dptrain_step_s") is not None}, key=str)
    for plane, wire, batch, warmup, steps, threads in settings:
        lines.append(f"dptrain: plane {plane or '-'}, wire {wire}; global batch {batch}, {warmup} warm-up + {steps} "
                     f"timed steps, {threads} thread(s) per process")
    lines.append("MB per timed step on the host's link (out = sent by the host); comm: dptrain = round - compute, "
                 "DDP = step - no_sync step; vs DDP = DDP step / dptrain step")
    lines.append("crypto s: CPU-seconds per step of every host's ZeroMQ I/O threads in user mode (CURVE sealing and "
                 "opening, with ZeroMQ's copies) and of the agents' AES-GCM sealing and opening, coordinator and agents "
                 "together; DDP's gloo does not encrypt")
    return "\n".join(lines)


# ---- the two runs -------------------------------------------------------------------------------------------------
def run_dptrain(c: Cluster, H: int, args, data: Path, out: Path, threads: int, user: list[str],
                timeout_s: float) -> dict:
    run = out / f"dptrain-h{H}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    hostfile = run / "hostfile"
    hostfile.write_text("".join(f"h{i} slots={args.slots}\n" for i in range(2, H + 2)))
    total = args.warmup + args.steps + 1  # + 1: see the module docstring (MB/step)
    per_epoch = max(1, args.images // args.batch_size)
    base = {"data.path": data, "data.image_size": args.image_size, "data.val_fraction": "0.0",
            "data.min_images_per_class": "1", "train.batch_size": args.batch_size,
            "train.epochs": 1 if per_epoch >= total else -(-total // per_epoch),
            "train.steps_per_epoch": min(per_epoch, total), "train.patience": "0", "train.out": run,
            "train.progress": "false", "dist.blas_threads": threads, "dist.timeline": run / "timeline.json"}
    argv = [sys.executable, "-m", "dptrain", "launch", "--hostfile", str(hostfile), "--ssh-config",
            str(c.ssh_config), "--bind", c.addr(1), *[f"--{k}={v}" for k, v in base.items()], *user]
    job = Job(argv, run / "launch.log", ns=c.ns(1))
    first, last = args.warmup - 1, args.warmup + args.steps - 1
    marks: dict[int, dict] = {}
    io: dict[int, dict] = {}  # the ZeroMQ I/O threads' CPU ticks per host at the same two marks
    sealed: dict[int, float | None] = {}  # the agents' AES-GCM CPU-seconds so far (metrics.jsonl) at the marks
    metrics, buf, offset = run / "metrics.jsonl", "", 0
    deadline = time.monotonic() + timeout_s
    try:
        while last not in marks:
            if metrics.exists() and metrics.stat().st_size > offset:
                with open(metrics) as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk.encode())
                recs, buf = complete_records(buf + chunk)
                for r in recs:
                    if "step_s" in r and r["step"] in (first, last):
                        marks[r["step"]] = {h: c.link_bytes(h) for h in (1, 2)}
                        io[r["step"]] = c.zmq_io_ticks()
                        sealed[r["step"]] = r.get("cipher_cpu_s")
            elif job.proc.poll() is not None:
                raise job.failure(f"dptrain launch on {H} hosts exited ({job.proc.returncode}) before its last "
                                  f"timed step ({last})")
            elif time.monotonic() > deadline:
                job.stop()
                raise job.failure(f"dptrain launch on {H} hosts: no step {last} within {timeout_s:.0f} s (killed)")
            else:
                time.sleep(POLL_S)
        job.wait(deadline - time.monotonic() + 60, f"dptrain launch on {H} hosts")
    finally:
        job.stop()
    recs = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    times = timed_step_s(recs, args.warmup, args.steps)
    step_s = sum(times) / len(times)
    row = {"dptrain_step_s": step_s, "dptrain_images_per_s": args.batch_size / step_s}
    try:
        split = split_from_timeline(run / "timeline.json", args.warmup, args.warmup + args.steps)
        row.update(dptrain_comm_s=split["comm_s"], dptrain_compute_s=split["compute_s"])
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        log.get().warning(f"no per-step split from {run / 'timeline.json'} ({e}); comm from summary.json")
    dist = tomllib.loads((run / "config.toml").read_text()).get("dist", {})  # the settings the run resolved
    row.update(plane=dist.get("plane"), wire_dtype=dist.get("wire_dtype"), bulk_cipher=dist.get("bulk_cipher"),
               factor_update=dist.get("factor_update"))
    if dist.get("plane") == "mesh" and dist.get("factored", True):  # (K, F) for `dptrain plan --validate`
        row["factored"] = factor_shape(load(str(run / "config.toml")), args.classes)
    bd = json.loads((run / "summary.json").read_text()).get("breakdown", {})
    row["dptrain_comm_all_s"] = bd.get("comm_s")
    row.setdefault("dptrain_comm_s", bd.get("comm_s"))
    row.setdefault("dptrain_compute_s", bd.get("compute_s"))
    for h in (1, 2):
        mb = per_step_mb(marks[first][h], marks[last][h], args.steps)
        row[f"h{h}_out_mb"], row[f"h{h}_in_mb"] = mb["out"], mb["in"]
    row.update(wire_cpu(io[first], io[last], args.steps))
    if sealed.get(first) is not None and sealed.get(last) is not None:  # AES-GCM runs on the agents' own threads
        aes = (sealed[last] - sealed[first]) / args.steps
        row.update(wire_aes_s=aes, wire_cpu_hosts_s=row["wire_cpu_hosts_s"] + aes, wire_cpu_s=row["wire_cpu_s"] + aes)
    return row


def run_ddp(c: Cluster, H: int, args, model: dict, out: Path, threads: int, timeout_s: float) -> dict:
    run = out / f"ddp-h{H}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    world, result = H * args.slots, run / "ddp.json"
    common = ["--world", str(world), "--master", f"{c.addr(2)}:{DDP_PORT}", "--result", str(result),
              "--batch-size", str(args.batch_size), "--image-size", str(args.image_size), "--classes",
              str(args.classes), "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(threads),
              "--iface", "eth0", "--model-json", json.dumps(model)]
    env = {"GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": str(threads)}
    jobs = []
    deadline = time.monotonic() + timeout_s
    try:
        for rank in range(world):
            host = 2 + rank // args.slots
            jobs.append(Job([sys.executable, "-m", "dptrain.bench.ddp", "--rank", str(rank), *common],
                            run / f"rank{rank}.log", ns=c.ns(host), env=env))
        pending = list(jobs)
        while pending:
            for j in list(pending):
                rc = j.proc.poll()
                if rc is not None:
                    pending.remove(j)
                    if rc != 0:
                        raise j.failure(f"DDP rank {jobs.index(j)} on {H} hosts: exit {rc}")
            if pending and time.monotonic() > deadline:
                raise pending[0].failure(f"DDP on {H} hosts: still running after its {timeout_s:.0f} s timeout")
            time.sleep(0.05)
    finally:
        for j in jobs:
            j.stop(grace_s=1.0)
    r = json.loads(result.read_text())
    step_s = r["step_ms"] / 1e3
    return {"ddp_step_s": step_s, "ddp_images_per_s": r["images_per_s"], "ddp_nosync_s": r["nosync_ms"] / 1e3,
            "ddp_comm_s": r["exposed_comm_ms"] / 1e3, "ddp_h2_out_mb": r["eth0_tx_bytes"] / r["steps"] / 1e6,
            "ddp_h2_in_mb": r["eth0_rx_bytes"] / r["steps"] / 1e6}


def bench_one(H: int, args, bps: float | None, user: list[str], threads: int, data: Path, model: dict | None,
                out: Path) -> dict:
    """One row: a fresh shaped cluster of H+1 hosts, dptrain then (model given) DDP on it, torn down after."""
    lg = log.get()
    # hard limits: generous for the default model at 1 Gbit/s, longer on slower links and with more hosts
    timeout_s = 240 + 60 * (args.warmup + args.steps) * max(1.0, H / 2) * max(1.0, 1e9 / (bps or 1e9))
    row = {"hosts": H, "slots": args.slots, "workers": H * args.slots, "rate": args.rate,
           "batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps, "threads": threads,
           "overrides": " ".join(user)}
    errors = []
    try:
        with Cluster(H + 1, args.slots) as c:
            lg.info(f"{H} hosts: cluster {c.prefix} up (h1 = head node {c.addr(1)}, agents h2..h{H + 1})"
                    + (f", every link shaped to {args.rate}" if bps else ", links not shaped"))
            if bps:
                c.shape(args.rate)
            lg.info(f"{H} hosts: dptrain, {args.warmup} warm-up + {args.steps} timed steps, batch {args.batch_size}, "
                    f"{threads} thread(s) per worker {' '.join(user)}".rstrip())
            try:
                row.update(run_dptrain(c, H, args, data, out, threads, user, timeout_s))
                lg.info(f"{H} hosts: dptrain {1e3 * row['dptrain_step_s']:.0f} ms/step, comm "
                        f"{1e3 * row['dptrain_comm_s']:.0f} ms, h1 out {row['h1_out_mb']:.1f} MB/step")
            except BenchError as e:
                lg.error(f"{H} hosts: {e}")
                errors.append(str(e).splitlines()[0])
            if model is not None:
                lg.info(f"{H} hosts: PyTorch DDP gloo, {H * args.slots} rank(s) on h2..h{H + 1}")
                row.update(run_ddp(c, H, args, model, out, threads, timeout_s))
                lg.info(f"{H} hosts: DDP {1e3 * row['ddp_step_s']:.0f} ms/step, exposed comm "
                        f"{1e3 * row['ddp_comm_s']:.0f} ms")
                if "dptrain_step_s" in row:
                    row["dptrain_vs_ddp"] = row["ddp_step_s"] / row["dptrain_step_s"]
    except BenchError as e:
        lg.error(f"{H} hosts: {e}")
        errors.append(str(e).splitlines()[0])
    if errors:
        row["error"] = "; ".join(errors)
    return row


# ---- the command --------------------------------------------------------------------------------------------------
def run(args, extra: list[str]) -> int:
    lg = log.get()
    try:
        hosts, bps = parse_hosts_list(args.hosts), rate_bps(args.rate)
        user = normalize_overrides(extra)
    except ValueError as e:
        raise SystemExit(f"dptrain bench: {e}") from None
    if args.slots < 1 or args.warmup < 1 or args.steps < 1:
        raise SystemExit("dptrain bench --hosts: --slots, --warmup and --steps must be >= 1 (the byte counters "
                         "start at the last warm-up step)")
    if os.geteuid() != 0 or not shutil.which("ip") or not os.access("/usr/sbin/sshd", os.X_OK):
        raise SystemExit("dptrain bench --hosts needs root, iproute2 and openssh-server (network namespaces with "
                         "sshd, launch/netns-cluster.sh; .ci/install-system.sh installs them)")
    ov = override_dict(user)
    try:  # the model and batch for DDP; dist.* keys are launch's business (and may be newer than this bench)
        cfg = config_mod.load(None, {"train.batch_size": str(args.batch_size), "data.image_size": str(args.image_size),
                                     **{k: v for k, v in ov.items() if not k.startswith("dist.")}})
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"dptrain bench: config error: {e}") from None
    model = config_mod.to_dict(cfg)["model"]
    try:
        blas = int(ov.get("dist.blas_threads", 0))
    except ValueError:
        raise SystemExit(f"dptrain bench: --dist.blas_threads wants an integer, got {ov['dist.blas_threads']!r}") from None
    ddp = not args.no_ddp
    if ddp and importlib.util.find_spec("torch") is None:
        lg.warning(f"PyTorch is not importable: DDP skipped ({install_hint('oracle')})")
        ddp = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = synth_dataset(args.images, args.image_size, args.classes, args.data_dir, not args.no_progress)
    old = {s: signal.signal(s, terminate) for s in (signal.SIGTERM, signal.SIGHUP)}
    rows = []
    try:
        cleanup_stale()
        for H in hosts:
            threads = blas or max(1, (os.cpu_count() or 1) // (H * args.slots))
            rows.append(bench_one(H, args, bps, user, threads, data, model if ddp else None, out))
    except KeyboardInterrupt:
        lg.error("interrupted: stopping every process and tearing the cluster down")
        return 130
    finally:
        down_all()
        for s, h in old.items():
            signal.signal(s, h)
    write_outputs(rows, out)
    print_rows(rows, args.json, format_table, [out / "bench-hosts.csv", out / "bench-hosts.json"])
    return 1 if any(r.get("error") for r in rows) else 0


def write_outputs(rows: list[dict], out: Path) -> None:
    write_rows(rows, out / "bench-hosts.csv", CSV_KEYS)
