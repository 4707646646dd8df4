"""The coordinator's control plane: one ZeroMQ ROUTER, the peer table, liveness, and rounds of messages.

Peers and their states: peers.py (a replacement is started by `replace_lost`, an agent joins with HELLO join).
A round sends STEP to every READY rank and waits for their RESULTs, serving sync-BN reductions (summed in rank
order) and heartbeats meanwhile. It never blocks for more than a poll tick, so a dead worker is noticed within
max(tick, its process exit | heartbeat_misses × heartbeat_interval_s | step_timeout_s), named, and raised as
`WorkerFailure`; what to do about it (abort or re-shard) is the executor's call.
"""
from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import zmq

from .. import log
from ..config import Config
from ..executors import ExecutorFailure
from . import protocol as P
from .curve import CurveServer
from .hostfile import rank_bases
from .peers import Peer, PeerState, killed_how
from .versions import local_versions, mismatches

POLL_TICK_S = 0.1
MAX_DRAIN = 1000  # messages handled per poll before liveness is checked again
LATE_WARNING_EVERY_S = 10.0
STACK_DUMP_WAIT_S = 0.5  # for a stuck rank's stack to reach its log
RSS_SAMPLE_S = 1.0  # how often the resident memory of a started process is sampled (to name an OOM kill)
JOIN_TIMEOUT_S = 120.0  # a replacement not READY this long after it was started is dead too


class StopTimeout(Exception):
    """The running step outlived its grace after a stop request (`stop_within`); raised before any update of this
    step, so the state is whole."""


class WorkerFailure(ExecutorFailure):
    def __init__(self, peers: list[Peer]):
        self.peers = peers
        super().__init__("; ".join(f"{p.describe()}: {p.death}" for p in peers))


class Coordinator:
    def __init__(self, cfg: Config, run_id: str, world_size: int, welcome: dict, welcome_arrays: dict,
                 curve_keys=None, slots: list[int] | None = None, bn_relay=None, endpoint: str | None = None,
                 token: str | None = None, max_frame: int = 0):
        self.cfg, self.run_id, self.world_size = cfg, run_id, world_size
        self.welcome, self.welcome_arrays = welcome, welcome_arrays
        self.log = log.get()
        self.ctx = zmq.Context()
        self.curve = None
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a message to a vanished peer is dropped, not an error
        # session.frame_limit: a larger frame drops its sender's connection before anything is allocated for it
        self.max_frame = max_frame
        if max_frame:
            self.sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
        if curve_keys is not None:
            self.curve = CurveServer(self.ctx, curve_keys)
            self.curve(self.sock)
        d = cfg.dist
        try:
            if endpoint is not None:  # one host: ipc:// in a private directory
                self.sock.bind(endpoint)
            elif d.port:
                endpoint = f"tcp://{d.bind}:{d.port}"
                self.sock.bind(endpoint)
            else:
                endpoint = f"tcp://{d.bind}:{self.sock.bind_to_random_port(f'tcp://{d.bind}')}"
        except zmq.ZMQError as e:  # an address not of this machine, a port in use
            self.close()
            raise SystemExit(f"cannot listen on {endpoint or f'tcp://{d.bind}'}: {e}") from None
        self.endpoint = endpoint
        # One host: the token the launcher gave its workers (on their stdin). No message from a ZeroMQ identity is
        # acted on, and nothing is sent to it, until it has proven the token (in its HELLO, or its heartbeat
        # socket's HEARTBEAT); others are dropped unanswered. Identities are random, so none can be claimed first.
        self.token = token
        self.trusted: set[bytes] = set()
        self.peers = {r: Peer(r, slots=(slots[r] if slots else 1)) for r in range(world_size)}
        self.rank_base = rank_bases([self.peers[r].slots for r in range(world_size)])  # first worker rank of a peer
        self.bn_relay = bn_relay  # agents: (layer, phase, host total) -> global total, through their coordinator
        self.ours = local_versions()
        self.dropped = 0
        self.bn_reductions = 0  # sync-BN sums served (none when one host's workers sum them in shared memory)
        self._drop_log = log.DropLog(P.DROP_LOG_BURST, P.DROP_LOG_WINDOW_S, P.DROP_LINE_CHARS)
        self.last_publish = (0.0, 0.0)  # (start, seconds) of the last round's STEP sends (weights, with sockets)
        self.stop_deadline: float | None = None  # after a stop request, give the running step this long
        # Capacity coming back (dist.on_worker_failure "continue"): respawn(peer) starts a replacement process for
        # a lost peer this coordinator started (its dead record) and returns (process, log path); at most
        # max_worker_restarts times over the run.
        self.respawn = None
        self.restarts = 0
        self.restart_limit = d.max_worker_restarts if d.on_worker_failure == "continue" else 0

    def adopt(self, rank: int, host: str, proc=None, log_path: Path | None = None) -> None:
        """Record what the launcher knows of rank's peer before it says HELLO: its host, and the process and log
        file when this process started it (so its exit is seen at once and its last lines can be shown)."""
        peer = self.peers[rank]
        peer.host, peer.proc, peer.log_path = host, proc, log_path
        if proc is not None:
            peer.pid = proc.pid

    def stop_within(self, grace_s: float) -> None:
        """A stop was requested: the running step may take grace_s more, then StopTimeout."""
        self.stop_deadline = time.monotonic() + grace_s

    # ---- sending -----------------------------------------------------------------------------------------------
    def send(self, peer: Peer, kind, step: int = 0, arrays=None, **fields) -> None:
        if peer.identity is None:
            return
        frames = P.encode(kind, self.run_id, step=step, rank=-1, arrays=arrays, **fields)
        self.sock.send_multipart([peer.identity, *frames], copy=False)

    def active(self) -> list[Peer]:
        return [p for r, p in sorted(self.peers.items()) if p.state is PeerState.READY]

    # ---- receiving ---------------------------------------------------------------------------------------------
    def _poll(self, timeout_s: float):
        """Yield (identity, Message) for every valid message arriving within timeout_s; drop the rest."""
        if not self.sock.poll(int(timeout_s * 1000)):
            return
        for _ in range(MAX_DRAIN):  # bounded: a flood cannot keep the caller from its liveness checks
            try:
                identity, *frames = self.sock.recv_multipart(copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # a ROUTER always prepends the identity; an empty multipart cannot happen
                continue
            try:
                msg = P.decode(frames, run=self.run_id, limits=P.DEFAULT_LIMITS)
            except P.ProtocolError as e:
                self._dropped(f"dropped a message from peer {bytes(identity.bytes)[:24]!r}: {e}")
                continue
            if not self._proven(identity.bytes, msg):
                continue
            yield identity.bytes, msg

    def _proven(self, identity: bytes, msg: P.Message) -> bool:
        """Whether `msg` may be acted on: with a token, its identity proved it (now, by a HELLO or HEARTBEAT that
        carries it, or before); and past HELLO and HEARTBEAT, it is the identity that said HELLO as that rank.
        Whatever fails is dropped unanswered, in a short, rate-limited line."""
        if self.token is not None and identity not in self.trusted:
            token = msg.fields.get("token")
            if msg.kind not in (P.Kind.HELLO, P.Kind.HEARTBEAT) or not isinstance(token, str) \
                    or not secrets.compare_digest(token.encode(), self.token.encode()):
                self._dropped(f"refused {msg.kind.name} claiming rank {msg.rank} from {identity[:24]!r}: not started "
                              f"by this run's launcher (no or wrong token)")
                return False
            self.trusted.add(identity)
        if msg.kind in (P.Kind.HELLO, P.Kind.HEARTBEAT):
            return True
        peer = self.peers.get(msg.rank)
        if peer is None or peer.identity != identity:
            self._dropped(f"dropped {msg.kind.name} claiming rank {msg.rank} from {identity[:24]!r}: not that "
                          f"rank's peer")
            return False
        return True

    def _dropped(self, line: str) -> None:
        """Count a dropped message and log it (cut short; past DROP_LOG_BURST in a DROP_LOG_WINDOW_S window only
        counted: log.DropLog)."""
        self.dropped += 1
        self._drop_log(line)

    def _handle_common(self, identity: bytes, msg: P.Message) -> bool:
        """Heartbeats, hellos, readies, errors and logs. Returns True when handled."""
        peer = self.peers.get(msg.rank)
        if msg.kind is P.Kind.HEARTBEAT:
            if peer is not None:
                peer.last_seen = time.monotonic()
                self.sock.send_multipart([identity, *P.encode(P.Kind.HEARTBEAT, self.run_id)])
            return True
        if msg.kind is P.Kind.HELLO:
            self._hello(identity, msg, peer)
            return True
        if peer is None or identity != peer.identity:  # checked in _proven already
            return True
        peer.last_seen = time.monotonic()
        if msg.kind is P.Kind.READY and peer.state is PeerState.WELCOMED:
            peer.state = PeerState.READY
            peer.mesh_endpoint = str(msg.fields.get("mesh_endpoint", ""))
            peer.mesh_key = str(msg.fields.get("mesh_key", ""))
            factor = msg.fields.get("mesh_factor") or ()
            peer.mesh_factor = tuple(int(v) for v in factor) if isinstance(factor, list) and len(factor) == 3 else ()
            peer.mesh_gemm = str(msg.fields.get("mesh_gemm", ""))
            if peer.replacement:
                self.log.warning(f"{peer.describe()} is back after {time.monotonic() - peer.started:.1f} s: it "
                                 f"takes part from the next step on")
            return True
        if msg.kind is P.Kind.ERROR:
            self._mark_dead(peer, f"reported an error: {msg.fields['message']}")
            peer.log_tail.extend(msg.fields["traceback"].splitlines())
            return True
        return False

    def _hello(self, identity: bytes, msg: P.Message, peer: Peer | None) -> None:
        def refuse(reason: str) -> None:  # a peer that proved the token or, across hosts, holds the run's key
            self._dropped(f"refused a peer claiming rank {msg.rank} from {P.short(msg.fields.get('host'))}: "
                          f"{reason}")
            self.sock.send_multipart([identity, *P.encode(P.Kind.STOP, self.run_id, reason=reason)])
        if msg.run != self.run_id:
            return refuse(f"wrong run id {msg.run!r}")
        if msg.fields.get("join") is True and self.token is None and not (  # an agent started later (--join)...
                peer is not None and peer.replacement and peer.state is PeerState.STARTING):  # ...not by us
            peer, why = self._join_as(msg)
            if peer is None:
                return refuse(why)
        if peer is None or peer.state is not PeerState.STARTING:
            return refuse(f"rank {msg.rank} is not expected (world size {self.world_size})")
        peer.identity, peer.host, peer.pid = identity, msg.fields["host"], msg.fields["pid"]
        bad = mismatches(msg.fields, self.ours)
        if bad:
            refuse("version mismatch: " + ", ".join(bad))
            self._mark_dead(peer, "preflight failed: " + ", ".join(bad))
            return
        if msg.fields["slots"] != peer.slots:
            refuse(f"peer {msg.rank} brings {msg.fields['slots']} slots, the launcher expected {peer.slots}")
            self._mark_dead(peer, f"preflight failed: slots {msg.fields['slots']} != {peer.slots}")
            return
        peer.state = PeerState.WELCOMED
        peer.last_seen = time.monotonic()
        self.send(peer, P.Kind.WELCOME, arrays=self.welcome_arrays, world_size=self.world_size,
                  rank_base=self.rank_base[peer.rank], your_rank=peer.rank, **self.welcome)

    # ---- capacity coming back ----------------------------------------------------------------------------------
    def _join_as(self, msg: P.Message) -> tuple[Peer | None, str]:
        """The rank a joining agent takes: the lost one it names, else the first lost one with as many slots (the
        layout of hosts x slots is fixed at launch; who fills it may change). (None, why) when there is none."""
        if self.cfg.dist.on_worker_failure != "continue":
            return None, "the run's policy is abort: a lost host ends it, nobody joins"
        lost = [p for r, p in sorted(self.peers.items()) if p.state is PeerState.DEAD and p.slots == msg.fields["slots"]]
        if not lost:
            return None, (f"no lost host with {msg.fields['slots']} slots to take the place of (hosts: "
                          + ", ".join(f"{p.rank} {p.state.value} slots={p.slots}" for p in self.peers.values()) + ")")
        old = next((p for p in lost if p.rank == msg.rank), lost[0])
        new = self.peers[old.rank] = Peer(old.rank, host=str(msg.fields["host"]), slots=old.slots, replacement=True)
        self.log.warning(f"host {new.host} joins in place of {old.describe()} (lost: {old.death})")
        return new, ""

    def replace_lost(self) -> None:
        """At a step boundary: a replacement process for every lost peer this coordinator started (`respawn`),
        while dist.max_worker_restarts allows, and the wait until every replacement is READY or lost (a process
        start, short against a run): so the steps after a loss run on the same ranks whatever the machine's speed,
        and the run's result depends on which step lost a rank, not on how long its replacement took to start."""
        if self.respawn is None:
            return
        self._respawn_lost()
        pending = [p for p in self.peers.values() if p.replacement and p.proc is not None
                   and p.state in (PeerState.STARTING, PeerState.WELCOMED)]
        while pending:
            self.service(POLL_TICK_S)
            self.check_liveness()
            pending = [p for p in pending if p.state in (PeerState.STARTING, PeerState.WELCOMED)]

    def _respawn_lost(self) -> None:
        for rank, peer in sorted(self.peers.items()):
            if peer.state is not PeerState.DEAD or peer.proc is None or peer.given_up:
                continue
            if self.restarts >= self.restart_limit:
                if self.restart_limit:
                    self.log.warning(f"not replacing {peer.describe()}: --max-worker-restarts "
                                     f"{self.restart_limit} used up")
                peer.given_up = True  # said once
                continue
            self.restarts += 1
            proc, log_path = self.respawn(peer)
            self.peers[rank] = Peer(rank, host=peer.host, slots=peer.slots, replacement=True)
            self.adopt(rank, peer.host, proc, log_path)
            self.log.warning(f"starting a replacement for rank {rank} on {peer.host} (pid {proc.pid}; restart "
                             f"{self.restarts} of {self.restart_limit})")

    # ---- liveness ----------------------------------------------------------------------------------------------
    def _dump_stack(self, peer: Peer) -> bool:
        """Ask a stuck process this coordinator started for every thread's Python stack (SIGUSR1: faulthandler,
        registered by workers) and give it a moment to reach its log. True when asked."""
        if peer.proc is None or peer.proc.poll() is not None or peer.log_path is None:
            return False
        try:
            os.kill(peer.proc.pid, signal.SIGUSR1)
        except OSError:
            return False
        time.sleep(STACK_DUMP_WAIT_S)
        return True

    def _mark_dead(self, peer: Peer, why: str, lines: int = 10) -> None:
        if peer.state in (PeerState.DEAD, PeerState.STOPPED):
            return
        peer.state, peer.death = PeerState.DEAD, why
        if peer.proc is not None and peer.proc.poll() is None:
            peer.proc.kill()
        lines = "\n    ".join(peer.last_lines(lines))
        self.log.error(f"{peer.describe()} is dead: {why}" + (f"; last log lines:\n    {lines}" if lines else ""))

    def check_liveness(self, waiting_on: list[Peer] = (), waiting_since: float = 0.0) -> None:
        """Mark peers dead: process exited, silent past the heartbeat budget, or stuck past step_timeout_s."""
        d = self.cfg.dist
        now = time.monotonic()
        if self.stop_deadline is not None and now > self.stop_deadline:
            raise StopTimeout("the current step did not finish after the stop request")
        for peer in self.peers.values():
            if peer.state in (PeerState.DEAD, PeerState.STOPPED):
                continue
            code = peer.proc.poll() if peer.proc is not None else None
            if code is None and peer.proc is not None and now - peer.rss_at > RSS_SAMPLE_S:
                peer.rss_at = now
                try:
                    peer.rss_mb = psutil.Process(peer.proc.pid).memory_info().rss / 1e6
                except psutil.Error:
                    pass
            if code is not None:
                self._mark_dead(peer, f"process exited with code {code}" + killed_how(peer, code))
            elif peer.state is PeerState.STARTING and peer.replacement and now - peer.started > JOIN_TIMEOUT_S:
                self._mark_dead(peer, f"replacement not ready after {JOIN_TIMEOUT_S:.0f} s")
            elif peer.state is not PeerState.STARTING and now - peer.last_seen > d.heartbeat_interval_s * d.heartbeat_misses:
                self._mark_dead(peer, f"silent for {now - peer.last_seen:.1f} s (missed heartbeats)")
            elif peer in waiting_on and now - waiting_since > d.step_timeout_s:
                dumped = self._dump_stack(peer)
                self._mark_dead(peer, f"stuck: no result after {now - waiting_since:.0f} s (step_timeout_s)"
                                + ("; its stack is in the last log lines" if dumped else ""), lines=60 if dumped else 10)

    def service(self, timeout_s: float) -> None:
        """Between rounds: answer heartbeats and hellos, notice deaths (an agent's workers while it waits upstream)."""
        for identity, msg in self._poll(timeout_s):
            self._handle_common(identity, msg)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while any(p.state is not PeerState.READY for p in self.peers.values()):
            for identity, msg in self._poll(POLL_TICK_S):
                if not self._handle_common(identity, msg):
                    self.log.warning(f"ignored {msg.kind.name} from rank {msg.rank} before start")
            self.check_liveness()
            dead = [p for p in self.peers.values() if p.state is PeerState.DEAD]
            if dead:
                raise WorkerFailure(dead)
            if time.monotonic() > deadline:
                late = [p for p in self.peers.values() if p.state is not PeerState.READY]
                for p in late:
                    self._mark_dead(p, f"not ready after {timeout_s:.0f} s (state {p.state.value})")
                raise WorkerFailure(late)

    # ---- one round -----------------------------------------------------------------------------------------------
    def round(self, step: int, attempt: int, shards: dict[int, np.ndarray], fields: dict,
              weights: dict | None = None, weights_version: int = 0, update: dict | None = None,
              shard_sizes: dict[int, list[int]] | None = None, arrays: dict | None = None,
              side=None, tick: tuple | None = None) -> dict[int, P.Message]:
        """STEP to every rank in `shards`; their RESULTs, keyed by rank. Raises WorkerFailure on a loss.

        fields: STEP's phase, epoch, global_count and eval_batch. With sockets, a peer that lacks `weights_version`
        gets `weights` (params + buffers), or `update` (update + buffers + update_scale) when it is one version
        behind. `shard_sizes[rank]` (agents): how the peer's block of indices splits over its slots. `arrays` go to
        every rank (the BN statistics, when the peers hold the weights); `side(msg)` gets the valid messages that
        belong to no round (a mesh plane's UPDATED of the step before). tick = (sockets, fn): fn() also runs whenever
        one of those sockets has something, until it returns False (an agent taking its all-gather while its workers
        compute)."""
        t_publish = time.time()
        arrays_all = arrays
        for rank, idx in shards.items():
            peer = self.peers[rank]
            extra = {}
            arrays = {"indices": idx, **(arrays_all or {})}
            if update is not None and peer.weights_version == weights_version - 1:
                arrays.update(update["arrays"])
                extra["update_scale"] = update["scale"]
                peer.weights_version = weights_version
            elif weights is not None and peer.weights_version != weights_version:
                arrays.update(weights)
                peer.weights_version = weights_version
            self.send(peer, P.Kind.STEP, step=step, arrays=arrays, attempt=attempt, weights_version=weights_version,
                      shard_sizes=shard_sizes[rank] if shard_sizes else [len(idx)], **fields, **extra)
        self.last_publish = (t_publish, time.time() - t_publish)  # (start, seconds) of handing out the step
        return self._collect(step, attempt, list(shards), P.Kind.RESULT, sync_bn=True, side=side, tick=tick)

    def exchange(self, kind: P.Kind, reply: P.Kind, step: int, attempt: int,
                 fields: dict[int, dict]) -> dict[int, P.Message]:
        """`kind` with fields[rank] to every rank in `fields`; their `reply`s, keyed by rank. Raises WorkerFailure
        on a loss, like a round."""
        for rank, f in fields.items():
            self.send(self.peers[rank], kind, step=step, attempt=attempt, **f)
        return self._collect(step, attempt, list(fields), reply)

    def collect(self, step: int, attempt: int, ranks: list[int], reply: P.Kind, side=None) -> dict[int, P.Message]:
        """`reply` of step `step` attempt `attempt` from every rank in `ranks`, nothing sent first."""
        return self._collect(step, attempt, ranks, reply, side=side)

    def _collect(self, step: int, attempt: int, ranks: list[int], reply: P.Kind,
                 sync_bn: bool = False, side=None, tick: tuple | None = None) -> dict[int, P.Message]:
        """Wait for `reply` from every rank in `ranks` (serving sync-BN reductions among them when asked),
        checking liveness every poll tick and naming the late every LATE_WARNING_EVERY_S."""
        waiting = {r: self.peers[r] for r in ranks}
        results: dict[int, P.Message] = {}
        bn: dict[tuple[int, str], dict[int, np.ndarray]] = {}
        since = last_warning = time.monotonic()
        wake = None
        if tick is not None:
            wake = zmq.Poller()
            for sock in (self.sock, *tick[0]):
                wake.register(sock, zmq.POLLIN)
        while waiting:
            if wake is not None:
                wake.poll(int(POLL_TICK_S * 1000))
                if not tick[1]():  # done with those sockets: they may hold what is for later, unread
                    wake = None
            for identity, msg in self._poll(0 if wake is not None else POLL_TICK_S):
                if self._handle_common(identity, msg):
                    continue
                if msg.step != step or msg.fields.get("attempt") != attempt:
                    if side is not None:
                        side(msg)
                    continue  # a late answer to an abandoned attempt
                if msg.kind is reply and msg.rank in waiting:
                    results[msg.rank] = msg
                    del waiting[msg.rank]
                elif sync_bn and msg.kind is P.Kind.BN_REDUCE and msg.rank in ranks:
                    self._bn_reduce(bn, msg, step, attempt, ranks)
                elif side is not None and msg.rank in ranks:
                    side(msg)  # e.g. a worker's BUCKET: its agent sends that part of the gradient on
            self.check_liveness(list(waiting.values()), since)
            dead = [self.peers[r] for r in ranks if self.peers[r].state is PeerState.DEAD]
            if dead:
                raise WorkerFailure(dead)
            if time.monotonic() - last_warning > LATE_WARNING_EVERY_S and waiting:
                last_warning = time.monotonic()
                late = ", ".join(p.describe() for p in waiting.values())
                self.log.warning(f"step {step}: waiting on {late} for {last_warning - since:.0f} s "
                                 f"({reply.name})")
        return results

    def _bn_reduce(self, bn: dict, msg: P.Message, step: int, attempt: int, shards: list[int]) -> None:
        """Collect one (layer, phase) reduction from every rank of the round; when complete, sum it in rank order
        and hand the total back to each of them."""
        layer, phase = msg.fields["layer"], msg.fields["phase"]
        got = bn.setdefault((layer, phase), {})
        got[msg.rank] = msg.arrays["moments"]
        if len(got) < len(shards):
            return
        sizes = {a.shape for a in got.values()}
        if len(sizes) != 1:
            self.log.warning(f"step {step}: BN layer {layer} ({phase}) sums of different shapes {sizes}; dropped")
            return
        total = np.zeros(next(iter(sizes)), np.float64)
        for rank in sorted(got):  # rank order, never arrival order
            total += got[rank]
        del bn[(layer, phase)]
        self.bn_reductions += 1
        if self.bn_relay is not None:  # an agent: the host's sum goes up, the global sum comes back
            total = self.bn_relay(layer, phase, total)
        for rank in shards:
            self.send(self.peers[rank], P.Kind.BN_REDUCED, step=step, arrays={"moments": total}, layer=layer,
                      phase=phase, attempt=attempt)

    def stop_all(self, reason: str) -> None:
        for peer in self.peers.values():
            if peer.state not in (PeerState.DEAD, PeerState.STOPPED):
                self.send(peer, P.Kind.STOP, reason=reason)
                peer.state = PeerState.STOPPED

    def close(self) -> None:
        self.sock.close(0)
        if self.curve is not None:
            self.curve.stop()
        self.ctx.term()
