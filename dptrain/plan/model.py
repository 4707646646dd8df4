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
    c      = ms_per_step + b × ms_per_image     one forward + backward on one core (calibrated: both terms); where
             the hidden Linear (K × F = 16384 × 512, 89 % of P) is factored (below), ms_per_step_factored + b ×
             ms_per_image_factored: backward leaves (x, dy) in shared memory and computes and writes no dW
             (calibrated too; not measured: the unfactored figures)
    G      = gemm_flops_per_s                   one core's float32 GEMM on dW = Xᵀ·dY's shape (calibrated)
    sw, sc = 1, 1 on separate hosts (S workers on S cores; a host's communication thread has a core of its own);
             with --shared-cores N (one box, as `dptrain bench --hosts` runs it: all H·S workers and all H hosts'
             communication threads share N cores): sw = max(1, H·S/N), sc = max(1, H/N)
    local  = S × 4P / mem_bytes_per_s          when S > 1: the host sums its S float32 gradients; factored, the
             other P − K·F only (mesh._outside_w, reduce.reduce_range)
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
          factored (mesh_layout.factors_pay(B, H, K, F); b_h = ceil(B/H)): the workers leave (x, dy); W's K·F weights leave
            the reduce-scatter, which carries (H−1)/H·(P − K·F)·wire bytes + the factors fb = 4·b_h·(K(H−1)/H +
            (H−1)F) (each owner its columns of x, every other host all of dy); local = S·4(P − K·F)/mem + the
            factors gathered, 4·b_h·(2K + F)/mem; then, serial after the reduce-scatter and before the update,
            dW = sw·(K/H)·B·F·2 / (S·G) + sc·4·B·(K/H + F)/mem: each owner's rows over the global batch on the
            host's S cores (the agent's BLAS; the workers are done), after concatenating every host's factors
          replicated (factored, and mesh_layout.replicate_pays(B, H, K, F, wire, dist.factor_update)): every host sends its
            samples' whole x and dy to every other host, fb = 4·(H−1)·b_h·(K + F) each way (factors gathered:
            4·b_h·(K + F)/mem); computes the whole dW, sw·K·B·F·2 / (S·G) + sc·4·B·(2K + F)/mem (every owner's
            rows, each from its columns of x cut out); and updates all of W itself: update =
            sc·((P − K·F)/H·u + K·F·(u + f16 apply: enc + dec per element with float16)); W leaves the all-gather:
            ag = (H−1)/H·(P − K·F)·wire/Bw + (H−1)·α
          sync = 2·M32/(H·k)/Bw                 a host's SYNC upload, averaged over the k steps
          wire = sc·(κ·(out + in)/2 + f16)       the host's CURVE and float16 work. Serial with the wire, not beside
                   it: CURVE seals a whole message before its first byte leaves and opens it after its last byte
                   arrives, and the hidden Linear's share of a slice (89 % of the bytes) is one message; float16 is
                   encoded before a send and decoded after it
          AES-GCM (dist.bulk_cipher) on separate hosts: the pool's threads (T = min(cipher_threads or 4, S)) seal
            and open pieces while others are on the wire, so the cipher is beside it, not in series
            (bench/cipher_pipeline.py; docs/performance-notes.md, plan):
            rs = max(rs, κ_aes·(out_rs + in_rs)/2) + fill(PIECE)   (under backward: the comm core alone)
            ag = max(ag, κ_aes·(out_ag + in_ag)/2/T) + fill(GATHER_PIECE)
            fill(p) = 3·κ_aes·min(p, a peer's bytes of the phase) (the first piece sealed, the last ones opened),
            and wire keeps float16 and the SYNC's CURVE only. With --shared-cores (every end on the same few cores,
            as the namespace rows) the cipher competes for the CPU: in series, as above
          comm = rs + ag + sync + wire + 2α
          hidden = min(overlap·c·sw, local + rs)   the local sum and the reduce-scatter run while backward goes on
                   (the hidden Linear's gradient is final ~10 % into backward, i.e. after ~40 % of c: overlap 0.6);
                   + ag − ag_exposed: with dist.gather_overlap the next step's forward before the factored Linear
                   (overlap_forward·c) runs while the all-gather arrives, ag_exposed = max(0, ag − overlap_forward·c);
                   with AES-GCM ag_exposed = (this host's own pieces sealed on the pool first: κ_aes·out_ag/2/T) +
                   max(0, max(ag wire, the others' opened on the comm core: κ_aes·in_ag/2) + fill − overlap_forward·c).
                   Nothing of it hides with --shared-cores fewer than H·(S + 1) (the workers' cores do that work)
          update = sc·U/H (replicated: above);  and a step is never shorter than the coordinator's link:
          2·M32/k / (Bw·coord_link_ratio)
    star  (every host sends M to the coordinator, which sums, updates and sends M back)
          comm = 2·max(H·M/Bw_coord, M/Bw) + 2α + κ·H·M·max(1, 2/N)   (the coordinator seals and opens H·M each way
          on its one I/O thread; on one box all ends share N cores);  hidden = 0;  update = U
    workers, coordinator   (one host, `launch --workers S`; H = 1; comm = the control messages, local_control_s)
          coordinator: the coordinator sums the S slots (local) and updates (U) alone while no worker computes
          workers: each worker sums its 1/S slice of every slot (4P / mem_bytes_per_s) and updates it (U/S),
          all at once; serial = the control messages only (what `dptrain plan --hosts 1 --slots 16` compares)
          factored (reduce.local_factors_pay(B, S, K, F), shm): the workers leave (x, dy); the sums skip W
          (P − K·F) and dW = Xᵀ·dY over the batch, B·K·F·2 flops, is computed by the coordinator alone (one BLAS
          thread: dW = 2KBF/G + 4B(K + F)/mem, the factors' copies) or by each worker for its 1/S of the rows
          (dW = sw·(2KBF/(S·G) + 4B(K/S + F)/mem))
    ddp   (PyTorch DDP's ring all-reduce over gloo, for comparison; plain TCP; no local sum: every rank is on the
          ring, W = H·S ranks, a host's S ranks adjacent)
          R    = 2·(W−1)/W·M                     what every rank sends (and receives) in the ring; it is also what
                   a host's link carries each way (H > 1), as only one ring edge leaves a host: with S = 2, H = 2
                   that is 1.5·M, not the M of a ring over hosts (measured 56.8 MB a step for M = 37.7 MB)
          ring = R / gloo_bytes_per_cpu_s        one rank's CPU for it (the loopback edges' TCP copies, the sums)
          comm = max(R/Bw, sw·ring) + 2·(W−1)·α  the lockstep stages go at the pace of the slower of the link
                   and the ranks' CPU (the link at 1–10 Gbit/s; at 25 Gbit/s a rank's gloo thread on its core)
          hidden = min(overlap_ddp·b·ms_per_image·sw, comm)   the rings run beside the conv layers' backward,
                   per-image work (see CostModel.overlap_ddp);  update = sw·U (every rank updates the whole model)

    step = c·sw + (local + comm − hidden) + dW + update   (compute + exposed local sum and communication + the
    factored Linear's dW + update);  images/s = B / step
    With --shared-cores N also step ≥ (all CPU work of a step on the box) / N: H·S·c + H·local, the hosts' and the
    coordinator's wire work (mesh: H·(κ·(out + in)/2 + f16) + κ/2·2·M32/k; star: 2κ·H·M; ddp: W·ring), dW's GEMMs
    and copies (2KBF/G, replicated H times) and the updates (mesh, star: U; replicated: H × a host's; ddp: H·S·U). On this
    2-core box the measured steps are that link-bound chain, not the CPU bound: the serial wire work is why
    dptrain's one-box steps are slower than the links alone would allow.
    efficiency = images/s ÷ (H × images/s of one host alone: c(ceil(B/S))·max(1, S/N) + local + U/S, no network;
    or, with a factored Linear, factored the same way, whichever is faster) ≤ 1; DDP's against one host of its
    own ranks (PyTorch's compute where calibrated)

Compute comes from --compute-ms-per-image [--compute-ms-per-step], from --calibrate (a few real training steps of
the model at two batch sizes in this process, one BLAS thread, warm-up excluded, via dptrain.bench.local), or from
the calibration cache ($DPTRAIN_CACHE or ~/.cache/dptrain, file plan-calibration.json, keyed by CPU model and
network); with neither flag and no matching cache entry it calibrates once and saves. The per-image cost is not
constant in the batch (a step has a fixed part: the 16384×512 hidden Linear, for one, reads its 32 MB of weights and
writes its 32 MB gradient whatever the batch), hence the fixed + per-image fit. The calibration times the step
twice, with that Linear factored and not, and G on the owners' GEMM shape; an entry from before it did (no
factored figures) stands, with the unfactored figures for the factored step and the default G (say --calibrate).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from .. import config as config_mod
from ..distributed.mesh_layout import GATHER_PIECE, PIECE, factors_pay, replicate_pays
from ..distributed.reduce import local_factors_pay
from ..nn.model import build_model
from ..nn.params import ParamStore

PLANES = ("star", "mesh", "ddp")
ONE_HOST = ("workers", "coordinator")
PLANE_DEFAULT = "star,mesh,ddp"  # `launch --workers S` on one host: dist.update = workers | coordinator
WIRE_BYTES = {"float32": 4, "float16": 2}
# AES-256-GCM through bulk.py's framing over a socket, sealed + opened per CPU-second, copies included
# (bench/cipher_throughput.py; the measurement: docs/performance-notes.md, plan): what a row run with
# dist.bulk_cipher = aes-gcm costs
AES_GCM_BYTES_PER_CPU_S = 1.15e9
CALIBRATION_FILE = "plan-calibration.json"
CALIBRATION_BATCHES = (2, 32)  # the fixed + per-image fit: two points, about 2 s for the default model


@dataclass(frozen=True)
class CostModel:
    """Every constant of the model, with the defaults `dptrain plan` uses; `dataclasses.replace` to fit."""
    ms_per_image: float  # forward + backward of one image on one core (BLAS 1 thread), the slope in the batch
    ms_per_step: float = 0.0  # the part of a worker's forward + backward that does not scale with its batch
    # the same with the factored Linear factored (Linear.factored: backward leaves x, dy and computes no dW, writes no
    # 32 MB gradient); None: not measured, the unfactored figures stand in (an over-estimate of the worker's step)
    ms_per_step_factored: float | None = None
    ms_per_image_factored: float | None = None
    # PyTorch's forward + loss + backward of the same network, one thread (the same fit; calibrate() measures it
    # where torch is installed): what a DDP rank computes. None: ours stands in
    ddp_ms_per_step: float | None = None
    ddp_ms_per_image: float | None = None
    # float32 GEMM FLOP/s of one core (BLAS 1 thread) on the factored Linear's dW = X^T dY, (1024 x B) @ (B x 512) at
    # B = 512 (calibrate() measures it; docs/performance-notes.md, plan)
    gemm_flops_per_s: float = 1.2e11
    latency_s: float = 50e-6  # α: per message (one-way), software + wire
    # payload bytes per line-rate byte: TCP/IPv4 with timestamps over a 1500-byte MTU carries 1448 bytes per
    # 1514-byte frame (0.956); DDP's plain gloo rows on the shaped namespace links fit 0.95
    link_efficiency: float = 0.95
    update_ns_per_param: float = 4.0  # clip + momentum SGD (+ weight decay) per parameter on one core
    mem_bytes_per_s: float = 5e9  # a host summing its S float32 gradients in shared memory
    coord_link_ratio: float = 1.0  # the coordinator's link bandwidth ÷ a host's (a head node with a fatter uplink)
    # wire bytes sealed (sender) + opened (receiver) with ZeroMQ CURVE per CPU-second, copies included (one
    # loopback stream of model-sized messages, CPU time of both ends; docs/performance-notes.md, plan); None: plain
    # links. Star and mesh only (DDP's gloo does not encrypt).
    curve_bytes_per_cpu_s: float | None = 0.62e9
    # dist.bulk_cipher = "aes-gcm": the mesh sockets' bytes sealed + opened with AES-256-GCM per CPU-second, copies
    # included (AES_GCM_BYTES_PER_CPU_S); None: the mesh's sockets are CURVE too. The coordinator's link (SYNC, the star) stays CURVE either way.
    aes_gcm_bytes_per_cpu_s: float | None = None
    f16_encode_ns: float = 3.2  # float32 -> float16 with a power-of-two scale, per element (numpy, one core)
    f16_decode_ns: float = 2.6  # float16 -> float32 (scaled) into the destination, per element
    # fraction of compute during which mesh's local sum and reduce-scatter run hidden: the hidden Linear (89 % of
    # the bytes) is final ~10 % into backward, after forward (~1/3 of c) + 10 % of backward (~2/3): ~0.6
    overlap: float = 0.6
    # fraction of the per-image part of compute (b × ms_per_image) that hides DDP's bucketed all-reduce; None:
    # `overlap`. The hidden Linear's bucket (89 % of the bytes) is ready once its backward is done; its ring then
    # runs beside the conv layers' backward, which is per-image work (about 2/3 of the per-image part: backward is
    # about twice forward), none of the batch-independent part. On the one-box bench (every rank, gloo thread and
    # the kernel's TCP on shared cores) about half of that is hidden: set from the batch-96 rows of
    # bench/netns-ddp-slots-2026-12-07 (docs/performance-notes.md, plan). On separate hosts up to ~0.67 (the whole
    # conv backward) is possible.
    overlap_ddp: float | None = 0.3
    # DDP's gloo ring: bytes a rank sends (receiving and summing as many) per CPU-second of that rank, TCP's
    # copies in the kernel included (loopback or not); `python -m dptrain.bench.ddp --ring-cpu W` measures it
    # (docs/performance-notes.md, plan)
    gloo_bytes_per_cpu_s: float = 1.65e9
    # all hosts on one box: every worker and every host's communication thread share this many cores (None: each
    # host has its own S cores, plus one for its communication)
    shared_cores: int | None = None
    # dist.cipher_threads: threads that seal and open AES-GCM frames side by side on a host (0: auto, min(4, S)).
    # On separate hosts the host's cipher work is spread over min(these, S) cores: the exposed part, the all-gather,
    # runs while the workers wait for the weights. Not with --shared-cores (the box's CPU bound holds it) or CURVE
    # (libzmq's one I/O thread).
    cipher_threads: int = 0
    # one host: the control messages of a step when the workers reduce and update (REDUCE/UPDATE and their replies
    # over ipc://): serial time per step (docs/performance-notes.md, plan)
    local_control_s: float = 0.8e-3
    # dist.gather_overlap: the fraction of a worker's compute before the factored Linear's forward, during which the
    # last step's all-gather still arrives (separate hosts only); 0: off. From the bench's layer timings
    # (docs/performance-notes.md, plan)
    overlap_forward: float = 0.3

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None and (not math.isfinite(v) or v < 0):
                raise ValueError(f"{f.name} must be a finite number >= 0, got {v!r}")
        for name in ("overlap", "overlap_ddp", "link_efficiency", "overlap_forward"):
            v = getattr(self, name)
            if v is not None and v > 1:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        for name in ("ms_per_image", "ms_per_image_factored", "ddp_ms_per_image", "link_efficiency", "mem_bytes_per_s",
                     "coord_link_ratio", "curve_bytes_per_cpu_s", "aes_gcm_bytes_per_cpu_s", "shared_cores",
                     "gloo_bytes_per_cpu_s", "gemm_flops_per_s"):
            if getattr(self, name) == 0:
                raise ValueError(f"{name} must be > 0")
        if self.shared_cores is not None and int(self.shared_cores) != self.shared_cores:
            raise ValueError(f"shared_cores must be a whole number of cores, got {self.shared_cores!r}")

    @property
    def wire_s_per_byte(self) -> float:
        """κ: CPU-seconds per wire byte of an encrypted link (sealing + opening)."""
        return 1.0 / self.curve_bytes_per_cpu_s if self.curve_bytes_per_cpu_s else 0.0

    @property
    def mesh_s_per_byte(self) -> float:
        """CPU-seconds per byte on the mesh's host-to-host sockets: AES-GCM's where dist.bulk_cipher says so (only
        on encrypted runs: without keys nothing is sealed), else CURVE's."""
        if self.aes_gcm_bytes_per_cpu_s and self.curve_bytes_per_cpu_s:
            return 1.0 / self.aes_gcm_bytes_per_cpu_s
        return self.wire_s_per_byte


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


def per_image_ms(model: CostModel, ddp: bool = False) -> float:
    """The per-image part of a worker's compute: a PyTorch DDP rank's with `ddp` where it was measured, else ours."""
    return model.ddp_ms_per_image if ddp and model.ddp_ms_per_image is not None else model.ms_per_image


def compute_s(model: CostModel, b: int, factored: bool = False, ddp: bool = False) -> float:
    """One worker's forward + backward of b images on one core; `factored`: with the factored Linear's weight
    gradient left as factors (the unfactored figures where that step was not measured); `ddp`: a PyTorch DDP rank's
    (ours where PyTorch's was not measured)."""
    if ddp and model.ddp_ms_per_image is not None:
        return ((model.ddp_ms_per_step or 0.0) + b * per_image_ms(model, ddp)) / 1e3
    if factored and model.ms_per_image_factored is not None:
        return ((model.ms_per_step_factored or 0.0) + b * model.ms_per_image_factored) / 1e3
    return (model.ms_per_step + b * model.ms_per_image) / 1e3


def local_reduce_s(model: CostModel, slots: int, num_params: int) -> float:
    """A host summing its S float32 gradients of num_params (the factored Linear's weights left out when they
    travel as factors: pass P − K·F)."""
    return slots * num_params * 4 / model.mem_bytes_per_s if slots > 1 else 0.0


def factor_copy_s(model: CostModel, samples: int, K: int, F: int, columns: bool = True) -> float:
    """A mesh agent gathering its samples' factors before it sends them (mesh.MeshReplica._send_factors): the
    workers' x (samples × K) and dy (samples × F) concatenated out of shared memory, then (owners, `columns`) each
    owner's columns of x cut out: bytes read, at mem_bytes_per_s, as the local sum counts them."""
    return 4 * samples * ((2 if columns else 1) * K + F) / model.mem_bytes_per_s


def gemm_s(model: CostModel, flops: float, cores: float) -> float:
    """`flops` of float32 GEMM (the factored Linear's dW = X^T dY) on `cores` cores."""
    return flops / (model.gemm_flops_per_s * cores)


def gather_s(model: CostModel, floats: float) -> float:
    """Copying `floats` float32 (the batch's factors concatenated, columns of x cut out) before dW's GEMM, one
    thread: bytes read at mem_bytes_per_s, as the local sum counts them."""
    return 4 * floats / model.mem_bytes_per_s


def update_s(model: CostModel, num_params: int) -> float:
    return num_params * model.update_ns_per_param * 1e-9


def sharing(model: CostModel, threads: int) -> float:
    """How much slower each of `threads` busy threads runs when they share the box's cores (1: not shared)."""
    return max(1.0, threads / model.shared_cores) if model.shared_cores else 1.0


def f16_s(model: CostModel, hosts: int, num_params: int, factored_params: int = 0, replicated: bool = False) -> float:
    """A mesh host's float16 encode + decode per step (see the module docstring); the factored Linear's weights
    (factored_params) are not in the reduce-scatter, only in the all-gather, and not there either when every host
    updates them itself (`replicated`: they never travel, so they are not rounded either)."""
    rs = num_params - factored_params  # its local sum encoded, the hosts' contributions to its slice decoded
    ag = num_params - factored_params if replicated else num_params  # its slice's update encoded, all decoded
    return (rs * (model.f16_encode_ns + model.f16_decode_ns)
            + ag * (model.f16_encode_ns / hosts + model.f16_decode_ns)) * 1e-9


PIPELINE_FILL_PIECES = 3.0  # bench/cipher_pipeline.py: the sealed stream's time over plain, in pieces' seal + open


def pipeline_fill(model: CostModel, piece_bytes: float, peer_bytes: float) -> float:
    """What a phase sealed with AES-GCM on separate hosts takes beyond max(wire, cipher): about three pieces' sealing
    and opening (the first piece sealed before a byte leaves, the last ones opened after they are in), a piece being
    at most what a peer gets in the phase."""
    return PIPELINE_FILL_PIECES * model.mesh_s_per_byte * min(piece_bytes, peer_bytes)


def replicated_update_s(model: CostModel, hosts: int, num_params: int, factored_params: int) -> float:
    """A mesh host's update when every host updates the factored Linear itself: its 1/H slice of the other weights
    and all K·F of that layer, one core (that layer never travels, so the float16 wire does not round it)."""
    return update_s(model, num_params - factored_params) / hosts + update_s(model, factored_params)


def ddp_ring(model: CostModel, hosts: int, slots: int, model_bytes: float) -> dict:
    """gloo's ring all-reduce over W = hosts × slots ranks: {"link_bytes": what a host's link carries each way,
    "cpu_s": one rank's CPU-seconds for it, on a core of its own}. Every rank sends 2(W−1)/W·M (W−1 reduce-scatter
    and W−1 all-gather stages of M/W each), receives as much and sums half of it; with the ranks of a host
    adjacent on the ring only one edge leaves each host (none with one host)."""
    W = hosts * slots
    per_rank = 2 * (W - 1) / W * model_bytes
    return {"link_bytes": per_rank if hosts > 1 else 0.0, "cpu_s": per_rank / model.gloo_bytes_per_cpu_s}


def baseline(slots: int, batch: int, num_params: int, model: CostModel,
             factored: tuple[int, int] | None = None, ddp: bool = False) -> dict:
    """One host alone, no network, at its best: its S workers compute, their gradients are summed (each worker its
    1/S slice, as `launch --workers S` does, or under backward as far as `overlap` allows, whichever is faster) and
    each worker updates its 1/S slice; or as DDP's ranks do, in gloo's ring over loopback). With a factored Linear
    (K, F) also the way that leaves its weight gradient as factors, whichever is faster (whatever
    reduce.local_factors_pay decides: a plane that factors must not beat the denominator): the workers' factored
    step, the sum of the other P − K·F, and each worker's 1/S of the rows of dW = X^T dY (B·K·F·2 flops; the
    factors' copies left out: a lower bound). No plane beats it, so efficiency stays <= 1. ddp: one host of
    PyTorch's ranks (its compute, calibrated where torch is installed; no factored layer), DDP's denominator."""
    b = per_worker_batch(batch, 1, slots)
    sw = sharing(model, slots)
    upd = update_s(model, num_params) * sw / slots

    def step(c: float, params: int, extra: float, ring: bool) -> float:
        parallel = 4 * params / model.mem_bytes_per_s if slots > 1 else 0.0  # each worker its 1/S slice
        hidden = max(0.0, local_reduce_s(model, slots, params) - model.overlap * c)  # or under backward
        options = [parallel, hidden]
        if ring:  # DDP's ranks of one host (float16 at best), less what hides beside the backward (as predict's)
            ov = model.overlap if model.overlap_ddp is None else model.overlap_ddp
            cpu = ddp_ring(model, 1, slots, 2 * params)["cpu_s"] * sw
            options.append(max(0.0, cpu - ov * b * per_image_ms(model, ddp) / 1e3 * sw))
        return c + min(options) + extra + upd

    best = step(compute_s(model, b, ddp=ddp) * sw, num_params, 0.0, True)
    if factored is not None and not ddp:
        K, F = factored
        dw = gemm_s(model, 2.0 * K * batch * F, slots) * sw  # each worker its 1/S of W's rows, one core each
        best = min(best, step(compute_s(model, b, True) * sw, num_params - K * F, dw, False))
    return {"per_worker_batch": b, "step_s": best, "images_per_s": batch / best}


def predict(plane: str, hosts: int, slots: int, batch: int, bandwidth_bps: float, wire_bytes: int, num_params: int,
            model: CostModel, sync_every: int = 10, factored: tuple[int, int] | None = None,
            factor_update: str = "owners") -> dict:
    """Predicted seconds, bytes and throughput of one step (see the module docstring for the formulas). Pure.
    factored: (K, F) of the Linear whose weight gradient is left as factors where the code decides so (mesh:
    mesh_layout.factors_pay; one host: reduce.local_factors_pay); factor_update (dist.factor_update, mesh): who computes and
    updates that layer's weights, decided by mesh_layout.replicate_pays ("owners": the rows' owners, as before it existed)."""
    if plane not in PLANES + ONE_HOST:
        raise ValueError(f"plane must be one of {', '.join(PLANES + ONE_HOST)}, got {plane!r}")
    if plane in ONE_HOST and hosts != 1:
        raise ValueError(f"plane {plane!r} is one host's (launch --workers S): hosts must be 1, got {hosts!r}")
    if wire_bytes not in (2, 4):
        raise ValueError(f"wire_bytes must be 2 (float16) or 4 (float32), got {wire_bytes!r}")
    if factor_update not in ("auto", "owners", "replicated"):
        raise ValueError(f"factor_update must be 'auto', 'owners' or 'replicated', got {factor_update!r}")
    for name, v in (("hosts", hosts), ("slots", slots), ("batch", batch), ("num_params", num_params),
                    ("sync_every", sync_every)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if factored is not None and (len(factored) != 2 or min(factored) < 1 or factored[0] * factored[1] > num_params):
        raise ValueError(f"factored must be (K, F) with 1 <= K·F <= num_params, got {factored!r}")
    if bandwidth_bps is None and plane in ONE_HOST:  # no link to size: one host's planes never use it
        bw = math.inf
    elif bandwidth_bps is None or not bandwidth_bps > 0 or not math.isfinite(bandwidth_bps):
        raise ValueError(f"bandwidth_bps must be positive and finite, got {bandwidth_bps!r}")
    else:
        bw = bandwidth_bps / 8 * model.link_efficiency  # a host's link, bytes/s each way
    H, S, M, a, k = hosts, slots, num_params * wire_bytes, model.latency_s, sync_every
    M32 = 4 * num_params
    coord_bw = bw * model.coord_link_ratio  # the coordinator's
    kappa = model.wire_s_per_byte if plane != "ddp" else 0.0
    N = model.shared_cores
    sw, sc = sharing(model, H * S), sharing(model, H)
    b = per_worker_batch(batch, H, S)
    K, F = factored or (0, 0)
    if plane == "mesh":
        use = factored is not None and factors_pay(batch, H, K, F)
    elif plane in ONE_HOST:
        use = factored is not None and local_factors_pay(batch, S, K, F)
    else:
        use = False
    repl = plane == "mesh" and use and replicate_pays(batch, H, K, F, wire_bytes, factor_update)
    KF = K * F if use else 0
    c1 = compute_s(model, b, use, ddp=plane == "ddp")
    t_compute = c1 * sw
    t_local = local_reduce_s(model, S, num_params - KF)
    U = update_s(model, num_params)
    t_gemm = cpu_gemm = 0.0
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
        # factored: the Linear's K x F weights leave the reduce-scatter; a host sends its ceil(B/H) samples' inputs
        # (split over the owners) and output gradients (to each other owner), float32, instead. Replicated: its
        # samples' whole inputs and output gradients to every other host, and W leaves the all-gather too
        bh = -(-batch // H)
        if repl:
            fb = (H - 1) * bh * (K + F) * 4
        else:
            fb = bh * (K * (H - 1) / H + (H - 1) * F) * 4 if use else 0.0
        Mrs = (num_params - KF) * wire_bytes
        Mag = Mrs if repl else M
        if use:
            t_local += factor_copy_s(model, bh, K, F, columns=not repl)
            # its rows of dW over the global batch (or all of them), after every host's factors are concatenated in
            # host order (replicated: then each owner's columns of x cut out, mesh._replicated_rows), on the agent's
            # BLAS, which has the host's S cores (the workers are done)
            flops = 2.0 * K * batch * F / (1 if repl else H)
            gathered = gather_s(model, batch * ((2 * K if repl else K / H) + F))
            t_gemm = gemm_s(model, flops, S) * sw + sc * gathered
            cpu_gemm = H * (flops / model.gemm_flops_per_s + gathered)
        rs = (H - 1) / H * Mrs / bw + fb / bw + (H - 1) * a
        ag = (H - 1) / H * Mag / bw + (H - 1) * a
        send = (H - 1) / H * (Mrs + Mag) + fb + 2 * M32 / (H * k)  # + its SYNC share, averaged over the k steps
        recv = (H - 1) / H * (Mrs + Mag) + fb
        sync = 2 * M32 / (H * k) / bw
        sync_bytes = 2 * M32 / (H * k)  # its SYNC share goes over the coordinator's CURVE link, the rest host to host
        sealing = model.mesh_s_per_byte * (send - sync_bytes + recv) / 2
        wire_host = sealing + kappa * sync_bytes / 2 + (f16_s(model, H, num_params, KF, repl) if wire_bytes == 2 else 0.0)
        own_cores = not N or N >= H * (S + 1)  # every worker and every host's communication on a core of its own
        aes = bool(model.aes_gcm_bytes_per_cpu_s and model.curve_bytes_per_cpu_s) and own_cores and H > 1
        ag_exposed = ag  # what of the all-gather the next step's forward cannot hide (dist.gather_overlap)
        if aes:  # separate hosts: sealed and opened on the pool beside the wire (the docstring's fill)
            threads = min(model.cipher_threads or 4, S)
            out_rs = (H - 1) / H * Mrs + fb
            out_ag = (H - 1) / H * Mag
            rs = max(rs, model.mesh_s_per_byte * out_rs) + pipeline_fill(model, PIECE * wire_bytes, out_rs / (H - 1))
            fill = pipeline_fill(model, GATHER_PIECE * wire_bytes, out_ag / (H - 1))
            # overlapped: this host's own pieces are sealed (on the pool) before it hands out the next step; the
            # others' arrive and are opened on its communication core while the workers compute
            seal_own = model.mesh_s_per_byte * out_ag / 2 / threads
            beside = max(ag, model.mesh_s_per_byte * out_ag / 2) + fill
            ag = max(ag, model.mesh_s_per_byte * out_ag / threads) + fill
            ag_exposed = seal_own + max(0.0, beside - model.overlap_forward * t_compute)
            wire = sc * (wire_host - sealing)
        else:  # CURVE (libzmq's one I/O thread) or every end on the same cores: in series
            wire = sc * wire_host
            if own_cores:
                ag_exposed = max(0.0, ag - model.overlap_forward * t_compute)
        comm = rs + ag + sync + wire + 2 * a
        window = model.overlap * t_compute
        local_hidden = min(window, t_local)
        # the reduce-scatter under backward; with --shared-cores and fewer cores than threads the all-gather's
        # receiving takes the workers' cores, so nothing of it hides (measured: no gain on the one-box bench)
        comm_hidden = min(window - local_hidden, rs) + (max(0.0, ag - ag_exposed) if own_cores else 0.0)
        if repl:
            host_update = replicated_update_s(model, H, num_params, KF)
            upd, cpu_update = sc * host_update, H * host_update
        else:
            upd, cpu_update = sc * U / H, U
        coord_in, coord_out = 2 * M32 / k, 0
        cpu_wire = H * wire_host + kappa * coord_in / 2
        extra = {"reduce_scatter_s": rs, "all_gather_s": ag, "sync_s": sync, "wire_cpu_s": wire}
    elif plane in ONE_HOST:  # no network; what is serial is what no worker computes during
        comm, send, recv, coord_in, coord_out, cpu_wire = model.local_control_s, 0, 0, 0, 0, 0.0
        # dW = X^T dY over the batch from the ranks' factors (reduce.factored_rows: dy concatenated, then x's
        # columns block by block)
        flops = 2.0 * K * batch * F if use else 0.0
        if plane == "coordinator":  # the coordinator sums the S slots, computes dW (one BLAS thread), updates, alone
            t_gemm = gemm_s(model, flops, 1) + (gather_s(model, batch * (K + F)) if use else 0.0)
            cpu_gemm = t_gemm
            upd, cpu_update = U, U
            extra = {"serial_s": t_local + t_gemm + U + comm}
        else:  # each worker sums its 1/S slice of every slot (S·4P/S bytes), computes its 1/S of dW's rows (one
            # core each) and updates that slice, in parallel
            t_local = 4 * (num_params - KF) / model.mem_bytes_per_s if S > 1 else 0.0
            gathered = gather_s(model, batch * (K / S + F)) if use else 0.0
            t_gemm = (gemm_s(model, flops, S) + gathered) * sw
            cpu_gemm = flops / model.gemm_flops_per_s + S * gathered
            upd, cpu_update = sw * U / S, U
            extra = {"serial_s": comm}
    else:
        # gloo's ring runs over all W = H·S ranks (host by host: ranks of a host are neighbours on the ring), so
        # the one ring edge that leaves a host carries 2(W−1)/W·M each way and gates every lockstep stage; the S−1
        # edges inside a host are loopback TCP, which costs CPU only (see ddp_ring)
        W = H * S
        t_local = 0.0  # no host sums its ranks' gradients: they are all on the ring
        ring = ddp_ring(model, H, S, M)
        send = recv = ring["link_bytes"]
        comm = max(ring["link_bytes"] / bw, sw * ring["cpu_s"]) + 2 * (W - 1) * a
        ov = model.overlap if model.overlap_ddp is None else model.overlap_ddp
        comm_hidden = min(ov * b * per_image_ms(model, ddp=True) / 1e3 * sw, comm)  # beside the per-image backward
        upd = sw * U
        coord_in = coord_out = 0
        cpu_wire = W * ring["cpu_s"]
        cpu_update = H * S * U
        extra = {"ring_wire_s": ring["link_bytes"] / bw, "ring_cpu_s": sw * ring["cpu_s"]}
    exposed = comm - comm_hidden
    step = t_compute + (t_local - local_hidden) + exposed + t_gemm + upd
    coord_link = max(coord_in, coord_out) / coord_bw
    coord_bound = plane == "mesh" and coord_link > step  # the SYNC uploads must fit in their k steps
    if coord_bound:
        step = coord_link
    cpu_s = (H * S * c1 + H * t_local + cpu_wire + cpu_gemm + cpu_update) / N if N else 0.0
    cpu_bound = bool(N) and cpu_s > step
    if cpu_bound:
        step = cpu_s
    base = baseline(S, batch, num_params, model, factored, ddp=plane == "ddp")
    ips = batch / step
    out = {"plane": plane, "hosts": H, "slots": S, "workers": H * S, "batch": batch, "per_worker_batch": b,
           "idle_workers": max(0, H * S - batch), "wire_bytes": wire_bytes,
           "bandwidth_bps": None if bandwidth_bps is None else float(bandwidth_bps),
           "num_params": num_params, "sync_every": k, "shared_cores": N, "model_bytes": M, "compute_s": t_compute,
           "local_reduce_s": t_local, "local_hidden_s": local_hidden, "comm_s": comm, "comm_hidden_s": comm_hidden,
           "comm_exposed_s": exposed, "factor_gemm_s": t_gemm, "update_s": upd, "step_s": step, "images_per_s": ips,
           "speedup": ips / base["images_per_s"], "efficiency": ips / (H * base["images_per_s"]),
           "baseline_step_s": base["step_s"], "host_send_bytes": send, "host_recv_bytes": recv,
           "coord_in_bytes": coord_in, "coord_out_bytes": coord_out, "coord_link_s": coord_link,
           "coord_bound": coord_bound, "cpu_s": cpu_s, "cpu_bound": cpu_bound, "factored": use, "replicated": repl}
    out.update(extra)
    return out


# ---------------------------------------------------------------------------------------------- the network

def factor_shape(cfg: config_mod.Config, classes: int) -> tuple[int, int] | None:
    """(K, F) of the model's factored Linear (the hidden one), or None."""
    import numpy as np

    layer = build_model(cfg.model, classes, cfg.data.image_size, ParamStore(np.float32)).factor_layer()
    return tuple(layer.w.shape) if layer is not None else None


def count_params(cfg: config_mod.Config, classes: int) -> int:
    import numpy as np

    store = ParamStore(np.float32)
    build_model(cfg.model, classes, cfg.data.image_size, store)  # registration only: nothing allocated
    return store.num_params
