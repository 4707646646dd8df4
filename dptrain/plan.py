"""`dptrain plan`: a cost model of one data-parallel training step on H hosts of S worker slots each.

    dptrain plan --hosts 1,16,64 --slots 8 --bandwidth 10gbit,25gbit [--wire-dtype float16] [--batch-size B]
                 [--plane star,mesh,ddp] [--shared-cores N] [--compute-ms-per-image X | --calibrate] [--json]
    dptrain plan --validate FILE... [--plot scaling.png]    measured rows (dptrain bench --hosts) against the
        model: step, exposed communication and bytes per step on a host's and the coordinator's link, measured and
        predicted, with the relative error. bench --hosts runs every host on one box, so --validate assumes
        --shared-cores = this machine's cores unless told otherwise (--shared-cores off: separate hosts). Flat rows
        with hosts, slots, rate, wire_dtype, plane, batch_size, step_s, comm_s are read too; extra keys are ignored.
        --plot draws measured (markers) and predicted (lines) step time against H per link rate.

Per host count it predicts the step time, its compute / local-reduce / communication (total and exposed) / update
parts, images/s, scaling efficiency against one host, and the bytes per step on a host's link and on the
coordinator's. Model and image keys are overridden like in `dptrain bench` (`--model.widths=[8,16]`); the sync
interval is dist.sync_every (`--dist.sync_every=20`).

The model (every constant is a field of `CostModel`, so predictions can be fitted to measurements):

    P, M   = num_params; M = P × wire bytes (4, or 2 with float16); M32 = 4P
    Bw     = bandwidth / 8 × link_efficiency    bytes/s per direction per host (full duplex); the coordinator's link
             is coord_link_ratio × that
    b      = ceil(B / (H·S))                    per-worker batch
    c      = ms_per_step + b × ms_per_image     one forward + backward on one core (calibrated: both terms)
    sw, sc = 1, 1 on separate hosts (S workers on S cores; a host's communication thread has a core of its own);
             with --shared-cores N (one box, as `dptrain bench --hosts` runs it: all H·S workers and all H hosts'
             communication threads share N cores): sw = max(1, H·S/N), sc = max(1, H/N)
    local  = S × 4P / mem_bytes_per_s          when S > 1: the host sums its S float32 gradients
    U      = P × update_ns_per_param            clip + momentum SGD of the whole model, one core
    κ      = 1 / curve_bytes_per_cpu_s          CPU-seconds per wire byte to seal it (sender) and open it (receiver)
             with ZeroMQ CURVE, copies included; 0 when the links are not encrypted (DDP's gloo never is)
    f16    = P × (enc·(1 + 1/H) + 2·dec)        a host's float16 work per step with --wire-dtype float16 (enc, dec:
             ns per element): its local sum encoded; the H contributions to its slice decoded; its slice's update
             encoded and decoded; the others' updates decoded. 0 with float32.

    mesh  (as built: the agents reduce-scatter each piece of the gradient to its slice's owner while backward goes
          on, owners send block sums of squares to the coordinator, which answers (lr, clip); owners update their
          1/H slice and all-gather it; every k = dist.sync_every steps the coordinator pulls each owner's slice of
          weights + momentum, float32, SYNC):
          a host's link per step: out = 2(H−1)/H·M + 2·M32/(H·k), in = 2(H−1)/H·M; the coordinator's: in = 2·M32/k
          rs = ag = (H−1)/H·M/Bw + (H−1)·α      reduce-scatter, all-gather on the wire
          sync = 2·M32/(H·k)/Bw                 a host's SYNC upload, averaged over the k steps
          wire = sc·(κ·(out + in)/2 + f16)       the host's CURVE and float16 work. Serial with the wire, not beside
                   it: CURVE seals a whole message before its first byte leaves and opens it after its last byte
                   arrives, and the hidden Linear's share of a slice (89 % of the bytes) is one message; float16 is
                   encoded before a send and decoded after it
          comm = local + rs + ag + sync + wire + 2α
          hidden = min(overlap·c·sw, local + rs)   the local sum and the reduce-scatter run while backward goes on
                   (the hidden Linear's gradient is final ~10 % into backward, i.e. after ~40 % of c: overlap 0.6);
                   the all-gather never overlaps (it needs the update)
          update = sc·U/H;  and a step is never shorter than the coordinator's link: 2·M32/k / (Bw·coord_link_ratio)
    star  (every host sends M to the coordinator, which sums, updates and sends M back)
          comm = 2·max(H·M/Bw_coord, M/Bw) + 2α + κ·H·M·max(1, 2/N)   (the coordinator seals and opens H·M each way
          on its one I/O thread; on one box all ends share N cores);  hidden = 0;  update = U
    workers, coordinator   (one host, `launch --workers S`; H = 1; comm = the control messages, local_control_s)
          coordinator: the coordinator sums the S slots (local) and updates (U) alone while no worker computes
          workers: each worker sums its 1/S slice of every slot (4P / mem_bytes_per_s) and updates it (U/S),
          all at once; serial = the control messages only (what `dptrain plan --hosts 1 --slots 16` compares)
    ddp   (PyTorch DDP's ring all-reduce over gloo, for comparison; plain TCP)
          comm = local + 2·(H−1)/H·M/Bw + 2·(H−1)·α;  hidden = min(overlap_ddp·c·sw, comm − local);
          update = sw·U (every rank updates the whole model)

    step = c·sw + comm − hidden + update   (compute + exposed communication + update);  images/s = B / step
    With --shared-cores N also step ≥ (all CPU work of a step on the box) / N: H·S·c + H·local, the hosts' and the
    coordinator's wire work (mesh: H·(κ·(out + in)/2 + f16) + κ/2·2·M32/k; star: 2κ·H·M) and the updates (mesh,
    star: U; ddp: H·S·U). On this 2-core box the measured steps are that link-bound chain, not the CPU bound:
    the serial wire work is why dptrain's one-box steps are slower than the links alone would allow.
    efficiency = images/s ÷ (H × images/s of one host alone: c(ceil(B/S))·max(1, S/N) + local + U/S, no network) ≤ 1

Compute comes from --compute-ms-per-image [--compute-ms-per-step], from --calibrate (a few real training steps of
the model at two batch sizes in this process, one BLAS thread, warm-up excluded, via dptrain.bench_local), or from
the calibration cache ($DPTRAIN_CACHE or ~/.cache/dptrain, file plan-calibration.json, keyed by CPU model and
network); with neither flag and no matching cache entry it calibrates once and saves. The per-image cost is not
constant in the batch (a step has a fixed part: the 16384×512 hidden Linear, for one, reads its 32 MB of weights and
writes its 32 MB gradient whatever the batch), hence the fixed + per-image fit.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

from . import config as config_mod, log

PLANES = ("star", "mesh", "ddp")
ONE_HOST = ("workers", "coordinator")
PLANE_DEFAULT = "star,mesh,ddp"  # `launch --workers S` on one host: dist.update = workers | coordinator
WIRE_BYTES = {"float32": 4, "float16": 2}
CALIBRATION_FILE = "plan-calibration.json"
CALIBRATION_BATCHES = (2, 32)  # the fixed + per-image fit: two points, about 2 s for the default model


@dataclass(frozen=True)
class CostModel:
    """Every constant of the model, with the defaults `dptrain plan` uses; `dataclasses.replace` to fit."""
    ms_per_image: float  # forward + backward of one image on one core (BLAS 1 thread), the slope in the batch
    ms_per_step: float = 0.0  # the part of a worker's forward + backward that does not scale with its batch
    latency_s: float = 50e-6  # α: per message (one-way), software + wire
    # payload bytes per line-rate byte: TCP/IPv4 with timestamps over a 1500-byte MTU carries 1448 bytes per
    # 1514-byte frame (0.956); DDP's plain gloo rows on the shaped namespace links fit 0.95
    link_efficiency: float = 0.95
    update_ns_per_param: float = 4.0  # clip + momentum SGD (+ weight decay) per parameter on one core
    mem_bytes_per_s: float = 5e9  # a host summing its S float32 gradients in shared memory
    coord_link_ratio: float = 1.0  # the coordinator's link bandwidth ÷ a host's (a head node with a fatter uplink)
    # wire bytes sealed (sender) + opened (receiver) with ZeroMQ CURVE per CPU-second, copies included: 0.62 GB/s
    # on this AMD EPYC (one loopback stream of 37.7 MB messages, CPU time of both ends); None: plain links.
    # Star and mesh only (DDP's gloo does not encrypt).
    curve_bytes_per_cpu_s: float | None = 0.62e9
    f16_encode_ns: float = 3.2  # float32 -> float16 with a power-of-two scale, per element (numpy, one core)
    f16_decode_ns: float = 2.6  # float16 -> float32 (scaled) into the destination, per element
    # fraction of compute during which mesh's local sum and reduce-scatter run hidden: the hidden Linear (89 % of
    # the bytes) is final ~10 % into backward, after forward (~1/3 of c) + 10 % of backward (~2/3): ~0.6
    overlap: float = 0.6
    # the same for DDP's bucketed all-reduce; None: `overlap`. On the one-box namespace bench DDP hides nothing
    # measurable (its exposed communication equals its ring's wire time within 5 %): 0.
    overlap_ddp: float | None = 0.0
    # all hosts on one box: every worker and every host's communication thread share this many cores (None: each
    # host has its own S cores, plus one for its communication)
    shared_cores: int | None = None
    # one host: the control messages of a step when the workers reduce and update (REDUCE/UPDATE and their replies
    # over ipc://): measured 0.7-0.9 ms of serial time per step on this box at N = 1..8
    local_control_s: float = 0.8e-3

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None and (not math.isfinite(v) or v < 0):
                raise ValueError(f"{f.name} must be a finite number >= 0, got {v!r}")
        for name in ("overlap", "overlap_ddp", "link_efficiency"):
            v = getattr(self, name)
            if v is not None and v > 1:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        for name in ("ms_per_image", "link_efficiency", "mem_bytes_per_s", "coord_link_ratio",
                     "curve_bytes_per_cpu_s", "shared_cores"):
            if getattr(self, name) == 0:
                raise ValueError(f"{name} must be > 0")
        if self.shared_cores is not None and int(self.shared_cores) != self.shared_cores:
            raise ValueError(f"shared_cores must be a whole number of cores, got {self.shared_cores!r}")

    @property
    def wire_s_per_byte(self) -> float:
        """κ: CPU-seconds per wire byte of an encrypted link (sealing + opening)."""
        return 1.0 / self.curve_bytes_per_cpu_s if self.curve_bytes_per_cpu_s else 0.0


# ---------------------------------------------------------------------------------------------- parsing

_BW_RE = re.compile(r"(?P<num>[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(?P<prefix>[kmgt]?)(?:bits?)?(?:/s)?", re.I)
_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_bandwidth(text: str | float | int) -> float:
    """A link rate in bits per second: 10gbit, 25Gbit, 1g, 100mbit, 2.5gbit/s, 1e9 (a bare number is bit/s).
    Byte units (10gbps, 1GB/s) are refused: tc reads `gbps` as gigabytes per second, most people as gigabits."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip()
        m = _BW_RE.fullmatch(s)
        if m is None:
            if re.fullmatch(r"[0-9.e+-]+\s*[kmgt]?(bps|b/s|b|bytes?(/s)?)", s, re.I):
                raise ValueError(f"bandwidth {text!r} is ambiguous (bits or bytes? tc reads 'gbps' as bytes/s): "
                                 "write it in bits per second, e.g. 10gbit, 100mbit")
            raise ValueError(f"bandwidth {text!r}: expected bits per second such as 10gbit, 25Gbit, 1g, 100mbit, 1e9")
        value = float(m["num"]) * _PREFIX[m["prefix"].lower()]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"bandwidth {text!r} must be a positive, finite rate")
    return value


def format_bandwidth(bps: float) -> str:
    for div, unit in ((1e12, "Tbit"), (1e9, "Gbit"), (1e6, "Mbit"), (1e3, "kbit")):
        if bps >= div:
            return f"{bps / div:g}{unit}"
    return f"{bps:g}bit"


def parse_hosts(text: str) -> list[int]:
    try:
        hosts = sorted({int(h) for h in text.split(",") if h.strip()})
    except ValueError:
        raise ValueError(f"--hosts wants a comma list of host counts, got {text!r}") from None
    if not hosts or hosts[0] < 1:
        raise ValueError(f"--hosts wants host counts >= 1, got {text!r}")
    return hosts


# ---------------------------------------------------------------------------------------------- the model

def per_worker_batch(batch: int, hosts: int, slots: int) -> int:
    return max(1, math.ceil(batch / (hosts * slots)))


def compute_s(model: CostModel, b: int) -> float:
    return (model.ms_per_step + b * model.ms_per_image) / 1e3


def local_reduce_s(model: CostModel, slots: int, num_params: int) -> float:
    return slots * num_params * 4 / model.mem_bytes_per_s if slots > 1 else 0.0


def update_s(model: CostModel, num_params: int) -> float:
    return num_params * model.update_ns_per_param * 1e-9


def sharing(model: CostModel, threads: int) -> float:
    """How much slower each of `threads` busy threads runs when they share the box's cores (1: not shared)."""
    return max(1.0, threads / model.shared_cores) if model.shared_cores else 1.0


def f16_s(model: CostModel, hosts: int, num_params: int) -> float:
    """A mesh host's float16 encode + decode per step (see the module docstring)."""
    return num_params * (model.f16_encode_ns * (1 + 1 / hosts) + 2 * model.f16_decode_ns) * 1e-9


def baseline(slots: int, batch: int, num_params: int, model: CostModel) -> dict:
    """One host alone, no network, at its best: its S workers compute, their gradients are summed (each worker its
    1/S slice, as `launch --workers S` does, or under backward as far as `overlap` allows, whichever is faster) and
    each worker updates its 1/S slice. No plane beats it, so efficiency stays <= 1."""
    b = per_worker_batch(batch, 1, slots)
    sw = sharing(model, slots)
    c = compute_s(model, b) * sw
    parallel = 4 * num_params / model.mem_bytes_per_s if slots > 1 else 0.0  # each worker its 1/S slice
    hidden = max(0.0, local_reduce_s(model, slots, num_params) - model.overlap * c)  # or under backward
    step = c + min(parallel, hidden) + update_s(model, num_params) * sw / slots
    return {"per_worker_batch": b, "step_s": step, "images_per_s": batch / step}


def predict(plane: str, hosts: int, slots: int, batch: int, bandwidth_bps: float, wire_bytes: int, num_params: int,
            model: CostModel, sync_every: int = 10) -> dict:
    """Predicted seconds, bytes and throughput of one step (see the module docstring for the formulas). Pure."""
    if plane not in PLANES + ONE_HOST:
        raise ValueError(f"plane must be one of {', '.join(PLANES + ONE_HOST)}, got {plane!r}")
    if plane in ONE_HOST and hosts != 1:
        raise ValueError(f"plane {plane!r} is one host's (launch --workers S): hosts must be 1, got {hosts!r}")
    if wire_bytes not in (2, 4):
        raise ValueError(f"wire_bytes must be 2 (float16) or 4 (float32), got {wire_bytes!r}")
    for name, v in (("hosts", hosts), ("slots", slots), ("batch", batch), ("num_params", num_params),
                    ("sync_every", sync_every)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not bandwidth_bps > 0 or not math.isfinite(bandwidth_bps):
        raise ValueError(f"bandwidth_bps must be positive and finite, got {bandwidth_bps!r}")
    H, S, M, a, k = hosts, slots, num_params * wire_bytes, model.latency_s, sync_every
    M32 = 4 * num_params
    bw = bandwidth_bps / 8 * model.link_efficiency  # a host's link, bytes/s each way
    coord_bw = bw * model.coord_link_ratio  # the coordinator's
    kappa = model.wire_s_per_byte if plane != "ddp" else 0.0
    N = model.shared_cores
    sw, sc = sharing(model, H * S), sharing(model, H)
    b = per_worker_batch(batch, H, S)
    c1 = compute_s(model, b)
    t_compute = c1 * sw
    t_local = local_reduce_s(model, S, num_params)
    U = update_s(model, num_params)
    extra: dict = {}
    local_hidden = comm_hidden = 0.0
    if plane == "star":
        wire = kappa * H * M * max(1.0, 2 / N if N else 1.0)
        comm = 2 * max(H * M / coord_bw, M / bw) + 2 * a + wire
        upd = U
        send = recv = M
        coord_in = coord_out = H * M
        cpu_wire = 2 * kappa * H * M
        cpu_update = U
    elif plane == "mesh":
        rs = ag = (H - 1) / H * M / bw + (H - 1) * a
        send = 2 * (H - 1) / H * M + 2 * M32 / (H * k)  # + its SYNC share, averaged over the k steps
        recv = 2 * (H - 1) / H * M
        sync = 2 * M32 / (H * k) / bw
        wire_host = kappa * (send + recv) / 2 + (f16_s(model, H, num_params) if wire_bytes == 2 else 0.0)
        wire = sc * wire_host
        comm = rs + ag + sync + wire + 2 * a
        window = model.overlap * t_compute
        local_hidden = min(window, t_local)
        comm_hidden = min(window - local_hidden, rs)
        upd = sc * U / H
        coord_in, coord_out = 2 * M32 / k, 0
        cpu_wire = H * wire_host + kappa * coord_in / 2
        cpu_update = U
        extra = {"reduce_scatter_s": rs, "all_gather_s": ag, "sync_s": sync, "wire_cpu_s": wire}
    elif plane in ONE_HOST:  # no network; what is serial is what no worker computes during
        comm, send, recv, coord_in, coord_out, cpu_wire = model.local_control_s, 0, 0, 0, 0, 0.0
        if plane == "coordinator":  # the coordinator sums the S slots, then updates, alone
            upd, cpu_update = U, U
            extra = {"serial_s": t_local + U + comm}
        else:  # each worker sums its 1/S slice of every slot (S·4P/S bytes) and updates that slice, in parallel
            t_local = 4 * num_params / model.mem_bytes_per_s if S > 1 else 0.0
            upd, cpu_update = sw * U / S, U
            extra = {"serial_s": comm}
    else:
        comm = 2 * (H - 1) / H * M / bw + 2 * (H - 1) * a
        ov = model.overlap if model.overlap_ddp is None else model.overlap_ddp
        comm_hidden = min(ov * t_compute, comm)
        upd = sw * U
        send = recv = 2 * (H - 1) / H * M
        coord_in = coord_out = 0
        cpu_wire = 0.0
        cpu_update = H * S * U
    exposed = comm - comm_hidden
    step = t_compute + (t_local - local_hidden) + exposed + upd
    coord_link = max(coord_in, coord_out) / coord_bw
    coord_bound = plane == "mesh" and coord_link > step  # the SYNC uploads must fit in their k steps
    if coord_bound:
        step = coord_link
    cpu_s = (H * S * c1 + H * t_local + cpu_wire + cpu_update) / N if N else 0.0
    cpu_bound = bool(N) and cpu_s > step
    if cpu_bound:
        step = cpu_s
    base = baseline(S, batch, num_params, model)
    ips = batch / step
    out = {"plane": plane, "hosts": H, "slots": S, "workers": H * S, "batch": batch, "per_worker_batch": b,
           "idle_workers": max(0, H * S - batch), "bandwidth_bps": float(bandwidth_bps), "wire_bytes": wire_bytes,
           "num_params": num_params, "sync_every": k, "shared_cores": N, "model_bytes": M, "compute_s": t_compute,
           "local_reduce_s": t_local, "local_hidden_s": local_hidden, "comm_s": comm, "comm_hidden_s": comm_hidden,
           "comm_exposed_s": exposed, "update_s": upd, "step_s": step, "images_per_s": ips,
           "speedup": ips / base["images_per_s"], "efficiency": ips / (H * base["images_per_s"]),
           "baseline_step_s": base["step_s"], "host_send_bytes": send, "host_recv_bytes": recv,
           "coord_in_bytes": coord_in, "coord_out_bytes": coord_out, "coord_link_s": coord_link,
           "coord_bound": coord_bound, "cpu_s": cpu_s, "cpu_bound": cpu_bound}
    out.update(extra)
    return out


# ---------------------------------------------------------------------------------------------- the network

def count_params(cfg: config_mod.Config, classes: int) -> int:
    import numpy as np

    from .nn.model import build_model
    from .nn.params import ParamStore
    store = ParamStore(np.float32)
    build_model(cfg.model, classes, cfg.data.image_size, store)  # registration only: nothing allocated
    return store.num_params


# ---------------------------------------------------------------------------------------------- calibration

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def calibration_path() -> Path:
    return Path(os.environ.get("DPTRAIN_CACHE") or "~/.cache/dptrain").expanduser() / CALIBRATION_FILE


def _key(cfg: config_mod.Config, classes: int, cpu: str) -> dict:
    return {"cpu_model": cpu, "model": dataclasses.asdict(cfg.model), "image_size": cfg.data.image_size,
            "classes": classes}


def fit_affine(points: dict[int, float]) -> tuple[float, float]:
    """(ms_per_step, ms_per_image) through two (batch, ms) points; a negative part is dropped (noise)."""
    (b0, t0), (b1, t1) = sorted(points.items())[:1] + sorted(points.items())[-1:]
    slope = (t1 - t0) / (b1 - b0) if b1 != b0 else t1 / b1
    fixed = t0 - b0 * slope
    if slope <= 0 or fixed < 0:
        return 0.0, t1 / b1
    return fixed, slope


def calibrate(cfg: config_mod.Config, classes: int, batches=CALIBRATION_BATCHES, warmup: int = 1,
              steps: int = 3) -> dict:
    """Time forward + loss + backward of the model at each batch (one BLAS thread, warm-up excluded)."""
    from .bench_local import run_local_bench
    points, sgd_ns = {}, []
    for b in batches:
        c = copy.deepcopy(cfg)
        c.train.batch_size = b
        r = run_local_bench(c, classes, 1, warmup, steps + (2 if b <= 8 else 0), False, progress=False)
        p = r["phases_ms"]
        points[b] = p["forward"] + p["loss"] + p["backward"]
        sgd_ns.append((p["grad_norm"] + p["sgd_update"]) * 1e6 / r["num_params"])
    fixed, slope = fit_affine(points)
    return {**_key(cfg, classes, cpu_model()), "ms_per_step": fixed, "ms_per_image": slope,
            "batches": list(batches), "measured_ms": {str(b): t for b, t in points.items()},
            "measured_update_ns_per_param": min(sgd_ns), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def load_calibration(cfg: config_mod.Config, classes: int, path: Path | None = None) -> dict | None:
    path = path or calibration_path()
    try:
        entries = json.loads(path.read_text())["entries"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.get().warning(f"{path}: unreadable calibration cache ({e}); calibrating again")
        return None
    key = _key(cfg, classes, cpu_model())
    for e in entries:
        if isinstance(e, dict) and all(e.get(k) == v for k, v in key.items()):
            return e
    return None


def save_calibration(entry: dict, path: Path | None = None) -> Path:
    from .fsutil import atomic_write
    path = path or calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        entries = json.loads(path.read_text())["entries"]
        if not isinstance(entries, list):
            entries = []
    except (OSError, ValueError, KeyError, TypeError):
        entries = []
    keys = ("cpu_model", "model", "image_size", "classes")
    entries = [e for e in entries if not (isinstance(e, dict) and all(e.get(k) == entry[k] for k in keys))]
    entries.append(entry)
    blob = json.dumps({"version": 1, "entries": entries}, indent=1).encode()
    atomic_write(path, lambda f: f.write(blob))
    return path


def compute_source(args, cfg: config_mod.Config, classes: int) -> tuple[float, float, str]:
    """(ms_per_step, ms_per_image, where they come from)."""
    lg = log.get()
    if args.compute_ms_per_image is not None:
        return args.compute_ms_per_step, args.compute_ms_per_image, "given"
    entry = None if args.calibrate else load_calibration(cfg, classes)
    if entry is None:
        lg.info(f"calibrating: training steps of the model at batch {' and '.join(map(str, CALIBRATION_BATCHES))}, "
                "1 BLAS thread, in this process")
        entry = calibrate(cfg, classes)
        where = save_calibration(entry)
        lg.info(f"saved the calibration to {where}")
        how = "calibrated now"
    else:
        how = f"calibration of {entry.get('created', '?')}"
    return (float(entry["ms_per_step"]), float(entry["ms_per_image"]),
            f"{how}, batch {' and '.join(map(str, entry.get('batches', [])))}, {entry['cpu_model']}, "
            f"1 BLAS thread; its SGD measured {entry.get('measured_update_ns_per_param', float('nan')):.1f} ns/param")


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
    return dict(o[2:].replace("-", "_").split("=", 1) if "=" in o else (o[2:], "") for o in items
                if isinstance(o, str) and o.startswith("--"))


def measured_rows(raw) -> tuple[list[dict], list[dict]]:
    """(flat rows, skipped) from a list of measured rows. A flat row has hosts, slots, rate, wire_dtype, plane,
    batch_size, step_s, comm_s (+ optional compute_s, host_out_mb, host_in_mb, coord_in_mb, coord_out_mb,
    sync_every). A row of `dptrain bench --hosts` (dptrain_step_s, ddp_step_s, h1_in_mb, ..., overrides) becomes a
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
                         "sync_every": ov.get("dist.sync_every"),
                         "step_s": r["dptrain_step_s"], "comm_s": r.get("dptrain_comm_s"),
                         "compute_s": r.get("dptrain_compute_s"), "host_out_mb": r.get("h2_out_mb"),
                         "host_in_mb": r.get("h2_in_mb"), "coord_in_mb": r.get("h1_in_mb"),
                         "coord_out_mb": r.get("h1_out_mb")})
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
    p = predict(row["plane"], int(row["hosts"]), int(row["slots"]), int(row["batch_size"]), bps, WIRE_BYTES[wire],
                int(row.get("num_params") or num_params), model, int(row.get("sync_every") or sync_every))
    step = float(row["step_s"])
    out = {"file": row.get("file", ""), "row": row.get("row"), "source": row.get("source", ""), "hosts": p["hosts"],
           "slots": p["slots"], "plane": p["plane"], "wire_dtype": wire, "bandwidth_bps": bps,
           "batch_size": p["batch"], "num_params": p["num_params"], "step_s": step, "pred_step_s": p["step_s"],
           "step_err": p["step_s"] / step - 1 if step > 0 else None, "pred_compute_s": p["compute_s"],
           "pred_cpu_s": p["cpu_s"]}
    if row.get("comm_s") is not None:
        out.update(comm_s=float(row["comm_s"]), pred_comm_s=p["comm_exposed_s"])
        out["comm_err"] = p["comm_exposed_s"] / out["comm_s"] - 1 if out["comm_s"] > 0 else None
        if out["source"] == "dptrain" and out["plane"] == "mesh":  # see format_validation: not the same quantity
            out["comm_err"] = None
    if row.get("compute_s") is not None:  # the rest of the model on top of the measured compute
        out["compute_s"] = float(row["compute_s"])
        out["pred_step_given_compute_s"] = p["step_s"] - p["compute_s"] + out["compute_s"]
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
    """Measured step time (markers) and predicted (lines) against H, one panel per link rate; a series per plane and
    wire dtype (dptrain mesh float32 / float16, DDP). Needs matplotlib (the `plot` extra)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = v["rows"]
    if not rows:
        raise ValueError("no rows to plot")
    rates = sorted({r["bandwidth_bps"] for r in rows}, reverse=True)
    series = sorted({(r["plane"], r["wire_dtype"]) for r in rows}, key=lambda s: (s[0] == "ddp", s))
    style = {s: (f"C{i}", "o^sDvP"[i % 6]) for i, s in enumerate(series)}
    fig, axes = plt.subplots(1, len(rates), figsize=(5.5 * len(rates), 4.4), squeeze=False, sharey=False)
    for ax, bps in zip(axes[0], rates):
        for s in series:
            pts = sorted((r for r in rows if r["bandwidth_bps"] == bps and (r["plane"], r["wire_dtype"]) == s),
                         key=lambda r: r["hosts"])
            if not pts:
                continue
            color, marker = style[s]
            name = f"{'DDP gloo' if s[0] == 'ddp' else 'dptrain ' + s[0]} {s[1] if s[0] != 'ddp' else ''}".strip()
            ax.plot([r["hosts"] for r in pts], [1e3 * r["step_s"] for r in pts], marker, color=color, ms=7,
                    mfc="none" if s[0] == "ddp" else color, ls="none", label=f"{name} measured")
            pred = sorted({(r["hosts"], r["pred_step_s"]) for r in pts})
            ax.plot([h for h, _ in pred], [1e3 * p for _, p in pred], "--" if s[0] == "ddp" else "-", color=color,
                    lw=1.5, label=f"{name} predicted")
        ax.set_title(f"{format_bandwidth(bps)}/s links")
        ax.set_xlabel("hosts H")
        ax.set_ylabel("step (ms)")
        ax.set_xticks(sorted({r["hosts"] for r in rows}))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


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
    p.add_argument("--f16-encode-ns", type=float, default=d.f16_encode_ns, help="float16 encode per element")
    p.add_argument("--f16-decode-ns", type=float, default=d.f16_decode_ns, help="float16 decode per element")
    p.add_argument("--overlap", type=float, default=d.overlap,
                   help="fraction of compute that hides mesh's local sum and reduce-scatter")
    p.add_argument("--overlap-ddp", type=float, default=d.overlap_ddp,
                   help="the same for DDP's all-reduce (default: 0, as measured on the one-box bench)")
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
    from .cli import parse_overrides
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
            f"{'exposed':>9}{'update':>9}{'step ms':>9}{'img/s':>9}{'eff':>6}{'host MB':>9}{'coord MB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        coord = r["coord_in_bytes"] / 1e6
        flags = (" coord-bound" if r["coord_bound"] else "") + (" cpu-bound" if r["cpu_bound"] else "")
        lines.append(
            f"{r['plane']:<{w}}{format_bandwidth(r['bandwidth_bps']):>8}{r['hosts']:>6}{r['workers']:>6}"
            f"{r['per_worker_batch']:>5}{_ms(r['compute_s'])}{_ms(r['local_reduce_s'])}{_ms(r['comm_s'])}"
            f"{_ms(r['comm_exposed_s'])}{_ms(r['update_s'])}{_ms(r['step_s'])}{r['images_per_s']:9.1f}"
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
    return "\n".join(lines)


def main(args: argparse.Namespace, extra: list[str]) -> int:
    cfg = _config(args, extra)
    err = lambda msg: SystemExit(f"dptrain plan: {msg}")  # noqa: E731
    if args.validate is None and (args.hosts is None or args.slots is None or args.bandwidth is None):
        raise err("--hosts, --slots and --bandwidth are required (or --validate FILE...)")
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
    fixed, per_image, source = compute_source(args, cfg, args.classes)
    try:
        model = CostModel(ms_per_image=per_image, ms_per_step=fixed, latency_s=args.latency_us * 1e-6,
                          link_efficiency=args.link_efficiency, update_ns_per_param=args.update_ns_per_param,
                          mem_bytes_per_s=args.mem_gb_per_s * 1e9, coord_link_ratio=args.coord_link_ratio,
                          curve_bytes_per_cpu_s=args.curve_gb_per_cpu_s * 1e9 if args.curve_gb_per_cpu_s else None,
                          f16_encode_ns=args.f16_encode_ns, f16_decode_ns=args.f16_decode_ns,
                          overlap=args.overlap, overlap_ddp=args.overlap_ddp, shared_cores=shared)
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
                raise err("--plot needs matplotlib: pip install -e '.[plot]'") from None
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
    rows = [predict(plane, h, args.slots, batch, bps, WIRE_BYTES[wire], num_params, model, sync_every)
            for bps in rates for plane in planes for h in hosts if plane not in ONE_HOST or h == 1]
    base = baseline(args.slots, batch, num_params, model)
    if args.json:
        print(json.dumps({**info, "wire_dtype": wire, "batch": batch, "slots": args.slots, "baseline": base,
                          "rows": rows}), flush=True)
        return 0
    idle = [r["hosts"] for r in rows if r["idle_workers"]]
    curve = (f"CURVE {model.curve_bytes_per_cpu_s / 1e9:g} GB per CPU-s" if model.curve_bytes_per_cpu_s
             else "plain links (no CURVE)")
    print(f"model: {num_params:,} params, {cfg.data.image_size}x{cfg.data.image_size}, {args.classes} classes; "
          f"M = {num_params * WIRE_BYTES[wire] / 1e6:.1f} MB per step on the wire ({wire})\n"
          f"compute: {fixed:.1f} ms/step + {per_image:.2f} ms/image per worker ({source})\n"
          f"{cores}; update {model.update_ns_per_param:g} ns/param, latency {model.latency_s * 1e6:g} us, link "
          f"efficiency {model.link_efficiency:g}, local sum {model.mem_bytes_per_s / 1e9:g} GB/s, {curve}, float16 "
          f"{model.f16_encode_ns:g}/{model.f16_decode_ns:g} ns per element, overlap {model.overlap:g} (ddp "
          f"{model.overlap if model.overlap_ddp is None else model.overlap_ddp:g}), sync every {sync_every} steps"
          + (f", coordinator link ×{model.coord_link_ratio:g}" if model.coord_link_ratio != 1 else "") + "\n"
          f"global batch {batch}, {args.slots} slot(s) per host; efficiency against 1 host alone, no network: "
          f"b={base['per_worker_batch']}, {1e3 * base['step_s']:.1f} ms/step, {base['images_per_s']:.1f} img/s\n"
          "ms per step; comm includes the CURVE and float16 work on the hosts' CPUs; host MB = bytes a host sends "
          "per step (it receives about as many); coord MB = into the coordinator per step\n", flush=True)
    print(format_table(rows), flush=True)
    if idle:
        print(f"\nnote: global batch {batch} < workers for {sorted(set(idle))} host(s): some workers get no images",
              flush=True)
    return 0
