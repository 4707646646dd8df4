"""A host agent: the coordinator's one peer per host in multi-host runs.

    dptrain agent --connect tcp://COORD:PORT --run RUN --host-index I --slots N (--keys FILE | --keys-stdin)
    dptrain agent --connect tcp://COORD:PORT --run RUN --join --slots N --keys FILE   (capacity coming back)

Started by `dptrain launch --hostfile` over ssh (keys on stdin), or by hand / by Slurm or mpirun in no-ssh mode
(keys from a 0600 file; host index and slots may come from SLURM_* / OMPI_* variables, see rankenv.py).

Upstream it is one CURVE-authenticated DEALER: HELLO (versions, code hash, slots) -> WELCOME (config, dataset
fingerprint) -> preflight (this host's copy of the dataset must exist and match) -> READY. Downstream it is a
coordinator of its own on 127.0.0.1: it builds this host's shared-memory image cache, starts `slots` workers and
feeds them the shards of its block of each global batch. It then sums its workers' gradients in local rank order and
sends ONE buffer up (optionally as float16): cross-host traffic grows with hosts, not workers. Sync-BN moments are
summed on the host, reduced globally through the coordinator, and handed back down.

Across hosts the gradients take one of two planes (dist.plane): "mesh" (default; mesh.py) reduce-scatters them
among the agents and each agent updates its slice of the weights and all-gathers the rest, so every link carries
O(model) bytes whatever the number of hosts; "star" sends the host's sum to the coordinator and takes the weights
back from it.

It exits when the coordinator says STOP, when the coordinator goes silent (heartbeats), when its ssh channel closes
(stdin EOF, with --keys-stdin), or on SIGTERM (once in the run: after the coordinator's STOP or --stop-grace-s, see
StopSignals); its workers follow within a second, and its shared memory goes with it. Started by a scheduler, it
waits for its key file (wait_for_keys) and for the coordinator's port (probe_port): tasks start in any order.
"""
from __future__ import annotations

import json
import os
import signal
import socket as pysocket
import stat
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import config as config_mod, log
from ..data.dataset import load_dataset
from ..nn.model import build_model
from ..nn.params import ParamStore
from ..nn.threads import gemm_signature, match_blas_threads
from ..optim import sgd_for
from . import protocol as P
from .coordinator import Coordinator, WorkerFailure
from .curve import client_setup, read_agent_keys
from .mesh import MeshLink, MeshReplica, checksum
from .mesh_layout import factors_pay, take_ranges
from .peer import PeerLink, leave, run_peer
from .rankenv import RankEnvError, coordinator_from_env, from_env
from .reduce import sum_in_order
from .session import Session, factor_layout, frame_limit
from .timeline import busy_s
from .wire import grad_frame, receive_weights


class AgentStop(BaseException):
    """SIGTERM / SIGINT, raised by the handler wherever the agent is. A BaseException, like KeyboardInterrupt, so
    that no `except Exception` on the way (a message's decoding drops whatever fails to decode) swallows it."""


class Agent:
    def __init__(self, endpoint: str, host_index: int, slots: int, run_id: str, keys: dict | None, host: str,
                 join: bool = False, wait_coordinator_s: float = 0.0):
        self.endpoint, self.index, self.slots, self.host, self.join = endpoint, host_index, slots, host, join
        self.wait_coordinator_s = wait_coordinator_s  # pods and tasks start in any order: wait for its port
        self.log = log.get()
        # While it waits upstream the agent answers its own workers (heartbeats, hellos, deaths).
        self.link = PeerLink(endpoint, run_id, host_index, f"host {host}", client_setup(keys) if keys else None,
                             idle=self._serve_local)
        self.keys = keys
        self.session: Session | None = None  # this host's side: shared memory, workers, local coordinator
        self.replica: MeshReplica | None = None  # dist.plane = "mesh": this host's part of the data plane

    def _serve_local(self) -> None:
        if self.session is not None and self.session.coord is not None:
            self.session.coord.service(0.0)

    # ---- set-up and preflight ------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 120.0) -> None:
        address = probe_port(self.endpoint, self.host, wait_s=self.wait_coordinator_s)
        msg = self.link.handshake("agent", self.host, self.slots, timeout_s, join=self.join)
        f = msg.fields
        if self.link.rank != self.index:  # joined in place of another lost host than the one asked for
            self.log.info(f"host {self.host}: joining as host {self.link.rank}")
        self.index = self.link.rank
        self.cfg = config_mod.from_dict(f["config"])
        d = self.cfg.dist
        self.link.start_heartbeat(d.heartbeat_interval_s, d.heartbeat_misses, watch_parent=False)
        try:  # preflight: this host's copy of the dataset
            ds = load_dataset(self.cfg.data, self.cfg.train.seed, progress=False)
        except (OSError, ValueError) as e:
            raise SystemExit(f"host {self.host}: preflight: dataset {self.cfg.data.path!r}: {e}") from None
        if ds.fingerprint != f["fingerprint"] or ds.class_names != f["class_names"]:
            raise SystemExit(f"host {self.host}: preflight: dataset {self.cfg.data.path!r} differs from the "
                             f"coordinator's (fingerprint {ds.fingerprint[:12]} != {f['fingerprint'][:12]})")
        self._start_local(ds, int(f["num_classes"]), int(f["rank_base"]), int(f["world_size"]))
        mesh = {}
        if self.cfg.dist.plane == "mesh":
            link = MeshLink(self.link.ctx, address, self.keys, self.link.run_id, self.index, self.host,
                            self.max_frame, self.cfg.dist.bulk_cipher,
                            self.cfg.dist.cipher_threads or min(4, os.cpu_count() or 1))
            self.replica = MeshReplica(link, sgd_for(self.store, self.cfg.train), self.params, self.buffers,
                                       self.cfg.dist.wire_dtype, self.param_starts, self.factor)
            self.replica.gate = self.gate
            mesh = {"mesh_endpoint": link.endpoint, "mesh_key": link.key,
                    "mesh_factor": list(self.factor[:3]) if self.factor else [], "mesh_gemm": gemm_signature()}
            self.log.info(f"host {self.host}: mesh endpoint {link.endpoint}, CURVE server key {link.key or 'none'}"
                          + (", bulk frames sealed with AES-256-GCM" if link.sealed else ""))
        self.link.send(P.Kind.READY, **mesh)
        self.log.info(f"host {self.host}: {self.slots} workers ready (ranks {f['rank_base']}.."
                      f"{f['rank_base'] + self.slots - 1})")

    def _start_local(self, ds, num_classes: int, rank_base: int, hosts: int) -> None:
        # the agent's own GEMMs (the factored Linear's dW) and SGD passes use this host's BLAS threads, and after
        # each GEMM OpenBLAS's threads would otherwise busy-wait ~2**28 cycles, taking the cores from the workers
        # (nn/threads.py). Neither changes a bit: GEMM shapes and thread counts stay, SGD is elementwise.
        match_blas_threads(self.cfg.train.short_blas_spin)
        self.session = Session(f"{self.link.run_id}h{self.index}{uuid.uuid4().hex[:4]}", self.cfg.dist.shm_dir)
        shared = self.session.shared
        store = self.store = ParamStore(np.float32)
        model = build_model(self.cfg.model, num_classes, self.cfg.data.image_size, store)
        self.param_starts = model.param_starts
        self.max_frame = frame_limit(self.cfg, model, len(ds.labels))
        layer = model.factor_layer() if self.cfg.dist.plane == "mesh" and self.cfg.dist.factored else None
        if layer is not None and not factors_pay(self.cfg.train.batch_size, hosts, *layer.w.shape):
            layer = None  # a batch this large: the gradient itself is fewer bytes
        # every segment this host makes, checked against the free space before the first is made (a container's
        # small /dev/shm: one line naming both figures and the fixes, never a SIGBUS)
        P, f32 = store.num_params, np.float32
        layout = {"images": (tuple(ds.images.shape), np.uint8), "params": ((P,), f32),
                  "buffers": ((store.num_buffers,), f32), "grads": ((self.slots, P), f32)}
        if layer is not None:
            layout.update(factor_layout(layer, self.slots, self.cfg.train.batch_size))
        overlap = self.cfg.dist.plane == "mesh" and self.cfg.dist.gather_overlap
        if overlap:
            layout["gate"] = ((2,), np.int64)
        try:
            self.session.plan(layout)
        except SystemExit as e:
            raise SystemExit(f"host {self.host}: {e}") from None
        images = shared("images", ds.images.shape, np.uint8, ds.images)
        params = shared("params", (store.num_params,), np.float32)
        buffers = shared("buffers", (store.num_buffers,), np.float32)
        grads = shared("grads", (self.slots, store.num_params), np.float32)
        self.params, self.buffers, self.grad_slots = params.array, buffers.array, grads.array
        self.gsum = np.empty(store.num_params, np.float32)
        shm = {k: s.spec() for k, s in zip(("images", "params", "buffers", "grads"), (images, params, buffers, grads))}
        # dist.gather_overlap: [generation, the weights final up to this offset], what the workers' layers wait on
        self.gate = None
        if overlap:
            gate = shared("gate", (2,), np.int64)
            self.gate = gate.array
            self.gate[:] = (0, store.num_params)
            shm["gate"] = gate.spec()
        self.factor = None  # (offset, rows K, cols F, x slots, dy slots) of the factored Linear (mesh.py)
        factored = {}
        if layer is not None:
            self.factor, factored = self.session.factor_arrays(layer, self.slots, self.cfg.train.batch_size)
        local_cfg = config_mod.from_dict(config_mod.to_dict(self.cfg))
        local_cfg.dist.port, local_cfg.dist.transport = 0, "shm"
        welcome = {"config": config_mod.to_dict(local_cfg), "shm": shm, "num_classes": num_classes,
                   "buckets": self.cfg.dist.plane == "mesh",  # workers say when parts of their gradient are final
                   "factored": factored}
        self.session.coord = Coordinator(local_cfg, self.session.run_id, self.slots, welcome, {"labels": ds.labels},
                                         bn_relay=self.link.allreduce, endpoint=self.session.local_endpoint(),
                                         token=self.session.token, max_frame=self.max_frame)
        out = Path(self.cfg.train.out) / "logs"
        out.mkdir(parents=True, exist_ok=True)
        self.session.start_workers(self.cfg, self.host,
                                   [out / f"{self.host}-rank{rank_base + r}.log" for r in range(self.slots)])

    # ---- steps ---------------------------------------------------------------------------------------------------
    def run_step(self, msg: P.Message) -> None:
        f = msg.fields
        if not receive_weights(self.params, self.buffers, msg.arrays, f) and "buffers" in msg.arrays:
            np.copyto(self.buffers, msg.arrays["buffers"])  # mesh: the weights are ours, the BN statistics not
        idx = np.asarray(msg.arrays["indices"], np.int64)
        bounds = np.cumsum([0, *f["shard_sizes"]])
        shards = {r: idx[bounds[r]:bounds[r + 1]] for r in range(self.slots) if bounds[r + 1] > bounds[r]}
        fields = {k: f[k] for k in ("phase", "epoch", "global_count", "eval_batch")} | {"weights_slot": -1}
        side = tick = None
        if self.replica is not None and f["phase"] == "train":
            if self.replica.gathering is not None:  # the last step's all-gather still arrives (dist.gather_overlap)
                fields["gate"] = self.replica.open_gate()
                tick = ([self.replica.mesh.sock, self.link.sock], lambda: self.replica.pump(self.link))
            self.replica.begin(msg.step, self.link.attempt, sorted(shards), self.grad_slots, self.gsum,
                               {r: len(s) for r, s in shards.items()})
            side = self.replica.on_bucket
        elif self.replica is not None:
            self.replica.finish_gather(self.link)
        try:
            results = self.session.coord.round(self.link.step, self.link.attempt, shards, fields, side=side,
                                               tick=tick)
        except WorkerFailure as e:
            raise SystemExit(f"host {self.host}: lost {e}") from None
        if self.replica is not None:
            self.replica.finish_gather(self.link)  # done already: every worker's forward needed all of it
        ranks = sorted(results)
        loss_sum = sum(results[r].fields["loss_sum"] for r in ranks)
        correct = sum(results[r].fields["correct"] for r in ranks)
        if f["phase"] == "eval":
            self.link.send_result("eval", len(idx), loss_sum, correct)
            return
        t0 = time.time()
        timings, moments = {}, None
        if ranks:
            if self.replica is None:  # the mesh sums piece by piece as backward goes (MeshReplica.on_bucket)
                sum_in_order(self.gsum, [self.grad_slots[r] for r in ranks])  # local rank order
            moments = sum(np.asarray(results[r].arrays["bn_moments"], np.float64) for r in ranks)
            busiest = max(ranks, key=lambda r: busy_s(results[r].fields["timings"]))
            timings = dict(results[busiest].fields["timings"])
        timings["host_reduce"] = [t0, time.time() - t0]
        if self.replica is not None:
            t1 = time.time()
            if self.replica.first_sent:  # pieces sent while the workers were still in backward
                timings["scatter_overlap"] = [self.replica.first_sent, t1 - self.replica.first_sent]
            squares = self.replica.finish_scatter(self.link)
            timings["scatter"] = [t1, time.time() - t1]
            self.link.send_result("train", len(idx), loss_sum, correct, timings, bn_moments=moments,
                                  arrays={"squares": squares}, cipher_cpu_s=self.replica.mesh.cipher_cpu_s)
            return
        grad, grad_scale = grad_frame(self.gsum, self.cfg.dist.wire_dtype)
        self.link.send_result("train", len(idx), loss_sum, correct, timings, grad_in="frame", grad=grad,
                              grad_scale=grad_scale, bn_moments=moments)

    # ---- the mesh plane ------------------------------------------------------------------------------------------
    def join_mesh(self, msg: P.Message) -> None:
        self.link.stash.clear()  # whatever was queued belongs to the plane this one replaces
        self.replica.gathering = None  # an all-gather of the plane this one replaces: never to complete
        self.replica.take_state(msg)
        self.link.send(P.Kind.MESHED, attempt=msg.fields["attempt"], mesh_id=msg.fields["mesh_id"])

    def update(self, msg: P.Message) -> None:
        f = msg.fields
        mesh = self.replica.mesh
        if (f["lo"], f["hi"]) != (mesh.lo, mesh.hi):
            raise SystemExit(f"host {self.host}: asked to update [{f['lo']}, {f['hi']}), this host owns "
                             f"[{mesh.lo}, {mesh.hi})")
        self.replica.update_gather(f["lr"], f["scale"], msg.step, f["attempt"], self.link,
                                   defer=self.gate is not None)

    def sync(self, msg: P.Message) -> None:
        """The coordinator takes this host's slice of the weights and momentum as the state, and checks our whole
        copy of the weights against it."""
        mesh, r = self.replica.mesh, self.replica
        r.finish_gather(self.link)  # the weights of the step asked about, whole
        replicated = {"velocity_crc": checksum(r.opt.velocity[r.w[0]:r.w[1]])} if r.replicate else {}
        # the ranges the coordinator asks for (mesh_layout.sync_ranges: with a replicated layer, this slice without it and
        # a share of it); an older coordinator names none: the slice
        ranges = [(int(a), int(b)) for a, b in msg.fields.get("ranges") or [[mesh.lo, mesh.hi]]]
        self.link.send(P.Kind.SYNCED, arrays={"params": take_ranges(r.params, ranges),
                                              "velocity": take_ranges(r.opt.velocity, ranges)},
                       attempt=msg.fields["attempt"], lo=mesh.lo, hi=mesh.hi, params_crc=checksum(r.params),
                       ranges=[list(x) for x in ranges], **replicated)

    def serve(self) -> int:
        handlers = None
        if self.replica is not None:
            handlers = {P.Kind.MESH: self.join_mesh, P.Kind.UPDATE: self.update, P.Kind.SYNC: self.sync}
        return self.link.serve(self.run_step, handlers)

    def close(self) -> None:
        if self.replica is not None:
            self.replica.mesh.close()
        if self.session is not None:
            self.session.close()
        self.link.close()


def probe_port(endpoint: str, host: str, timeout_s: float = 10.0, wait_s: float = 0.0) -> str:
    """Preflight: a plain TCP connect first, because ZeroMQ retries an unreachable address silently forever.
    A refused or unresolvable address is tried again, backing off up to BACKOFF_MAX_S, until `wait_s` has passed:
    the coordinator binds only once it has loaded the data, and a scheduler (a Kubernetes Job, srun, mpirun) may
    start the agents first. Returns this host's address on the way to the coordinator (where the other agents
    reach it too)."""
    addr, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    deadline = time.monotonic() + wait_s
    pause, told = BACKOFF_FIRST_S, False
    while True:
        try:
            with pysocket.create_connection((addr, int(port)), timeout=timeout_s) as s:
                return s.getsockname()[0]
        except OSError as e:
            left = deadline - time.monotonic()
            if left <= 0:
                waited = f" for {wait_s:.0f} s (--wait-coordinator-s)" if wait_s > 0 else ""
                raise SystemExit(f"host {host}: preflight: cannot reach the coordinator at {addr}:{port}{waited}: "
                                 f"{e}") from None
            if not told:
                log.get().info(f"host {host}: waiting for the coordinator at {addr}:{port} ({e}; up to "
                               f"{wait_s:.0f} s)")
                told = True
            time.sleep(min(pause, left))
            pause = min(pause * 2, BACKOFF_MAX_S)


BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.25, 4.0  # a closed port is tried again after 0.25, 0.5, 1, 2, 4, 4... s


def key_file_mode_problem(st) -> str | None:
    """Why a key file's owner or mode make it unfit to hold a run's secret key (None: fine). Readable by the file's
    group is allowed (a Kubernetes Secret mounted with an fsGroup is 0440); others' access or another owner not."""
    if st.st_uid not in (os.geteuid(), 0):
        return f"owned by uid {st.st_uid}, not this user ({os.geteuid()}) or root"
    if st.st_mode & 0o027:
        return f"mode {stat.S_IMODE(st.st_mode):04o} lets others read or write it (chmod 600)"
    return None


def wait_for_keys(path: Path, run_id: str, host: str, wait_s: float) -> dict:
    """No-ssh mode: the run's agent keys from `path`, once the launcher has written them for THIS run. A file that
    is absent, or that names another run (a requeued job's earlier start left it), is waited for, not used; one
    saying that the launcher failed ends the agent at once with the launcher's reason; one that others may read, or
    that another user owns, is refused. Pre-made keys (`dptrain keys`) name no run and are used as they are."""
    deadline = time.monotonic() + wait_s
    told = None
    while True:
        why = None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # NONBLOCK: a FIFO at the path must not hang us
        except FileNotFoundError:
            why = "it does not exist yet"
        except OSError as e:
            raise SystemExit(f"host {host}: key file {path}: {e.strerror}") from None
        if why is None:
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise SystemExit(f"host {host}: key file {path} is not a regular file")
                problem = key_file_mode_problem(st)
                if problem:
                    raise SystemExit(f"host {host}: key file {path} is {problem}")
                text = f.read(64 * 1024).decode(errors="replace")
            try:
                data = json.loads(text)
            except ValueError:
                data = None
            run = data.get("run") if isinstance(data, dict) else None
            if run is not None and run != run_id:
                why = f"it is for run {run!r}, not {run_id!r} (left by an earlier start?)"
            elif isinstance(data, dict) and "failed" in data:
                raise SystemExit(f"host {host}: the launcher of run {run_id} failed before it wrote the keys: "
                                 f"{data['failed']}")
            else:
                return read_agent_keys(text, str(path))
        if time.monotonic() >= deadline:
            raise SystemExit(f"host {host}: no key file for run {run_id} at {path} after {wait_s:.0f} s "
                             f"(--wait-keys-s): {why}")
        if why != told:
            log.get().info(f"host {host}: waiting for the key file {path}: {why}")
            told = why
        time.sleep(0.5)


def default_label(environ=None) -> str:
    """The agent's name in logs when --host-label is not given: Slurm's node name (every namespace, container or
    node may share one machine name), else the machine's name, with Open MPI's rank when mpirun started it."""
    environ = os.environ if environ is None else environ
    if environ.get("SLURMD_NODENAME"):
        return environ["SLURMD_NODENAME"]
    name = pysocket.gethostname()
    rank = environ.get("OMPI_COMM_WORLD_RANK")
    return f"{name}-{rank}" if rank and rank.isdigit() else name


class StopSignals:
    """SIGTERM / SIGINT. A scheduler that stops a job signals every process of it at once (Slurm's requeue, scancel
    and time limit; mpirun; Kubernetes deleting the Pods), the coordinator included, which then finishes its step
    and writes last.npz, for which it needs this agent's part of the state. So once the agent is in the run the
    first signal only starts a countdown of `grace_s`: the coordinator's STOP, or its silence, ends the agent in
    order before that. A second signal, the countdown's end, a signal before the coordinator has welcomed the agent
    or after `now()` (ssh mode: the channel closed, the launcher is gone) stop it at once (AgentStop)."""

    def __init__(self, host: str, grace_s: float, in_run=lambda: True):
        self.host, self.grace_s, self.in_run, self.signalled = host, grace_s, in_run, False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self)
        signal.signal(signal.SIGINT, self)

    def now(self) -> None:
        self.grace_s = 0.0

    def __call__(self, signum, frame) -> None:
        if self.signalled or self.grace_s <= 0 or not self.in_run():
            raise AgentStop(f"signal {signum}")
        self.signalled = True
        log.get().warning(f"host {self.host}: signal {signum}: stopping when the coordinator has finished its step "
                          f"and checkpoint (its STOP), at most {self.grace_s:.0f} s from now; again to stop at once")
        timer = threading.Timer(self.grace_s, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()


def _watch_stdin(stop: StopSignals) -> None:
    """ssh mode: the channel closing (launcher gone, Ctrl-C, lost connection) ends the agent at once."""
    def watch():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        stop.now()
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, daemon=True, name="stdin-watch").start()


def _raise_stop(signum, frame):
    raise AgentStop(f"signal {signum}")


@dataclass
class AgentOptions:
    """`dptrain agent`'s options (cli.py makes them from its arguments): which coordinator and run, this host's place
    and workers, where the keys come from, and how long to wait for each."""
    connect: str | None = None  # tcp://HOST:PORT; None: MASTER_ADDR and MASTER_PORT
    run: str | None = None  # the run id the coordinator printed
    host_index: int | None = None  # this host's position in the hostfile; None: from the scheduler's rank variables
    slots: int = 1
    keys: str | None = None  # the run's agent key file (no-ssh mode)
    keys_stdin: bool = False  # the keys come on stdin (ssh); exit when stdin closes
    wait_keys_s: float = 60.0
    wait_coordinator_s: float = 300.0
    stop_grace_s: float = 20.0
    host_label: str | None = None
    join: bool = False  # take the place of a lost host in a running job


def run_agent(opts: AgentOptions) -> int:
    host = opts.host_label or default_label()
    log.setup(f"agent@{host}")
    index, slots = opts.host_index, opts.slots
    try:
        env = from_env() if index is None else None  # a stray RANK in a shell must not matter with --host-index
        opts.connect = opts.connect or coordinator_from_env()
    except RankEnvError as e:
        raise SystemExit(f"dptrain agent: {e}") from None
    if not opts.connect:
        raise SystemExit("dptrain agent: --connect tcp://HOST:PORT not given and MASTER_ADDR/MASTER_PORT not set")
    if not opts.run:
        raise SystemExit("dptrain agent: --run not given and DPTRAIN_RUN_ID/TORCHELASTIC_RUN_ID not set")
    if index is None and opts.join:
        index = 0  # any lost host: the coordinator says which one this agent replaces
    if index is None:
        if env is None:
            raise SystemExit("dptrain agent: --host-index not given and no DPTRAIN_/OMPI_/SLURM_/torchrun (RANK) "
                             "rank in the environment")
        if env.local_rank != 0:
            raise SystemExit(f"dptrain agent: local rank {env.local_rank} ({env.source}): start ONE agent per host "
                             f"(srun --ntasks-per-node=1, mpirun --map-by ppr:1:node); it starts the workers")
        # OMPI_COMM_WORLD_NODE_RANK is a rank *within* the node (across jobs), not the node's index: with one agent
        # per node, the world rank is the host index. SLURM_NODEID / DPTRAIN_NODE_RANK are node indices.
        index = env.node_rank if env.node_rank is not None and env.source != "openmpi" else env.rank
    agent = None
    stop = StopSignals(host, opts.stop_grace_s, lambda: agent is not None and agent.link.welcomed)
    if opts.keys_stdin:
        keys = read_agent_keys(sys.stdin.readline(), "stdin")
        _watch_stdin(stop)
    elif opts.keys:
        keys = wait_for_keys(Path(opts.keys), opts.run, host, opts.wait_keys_s)
    else:
        keys = None
    stop.install()
    agent = Agent(opts.connect, index, slots, opts.run, keys, host, join=opts.join,
                  wait_coordinator_s=opts.wait_coordinator_s)
    rc = 1
    try:
        rc = run_peer(agent.link, lambda: (agent.start(), agent.serve())[1], (AgentStop,))
    finally:
        agent.close()
        leave(rc)
