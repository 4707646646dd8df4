"""ZeroMQ CURVE for multi-host runs: encryption plus authentication of every peer.

The launcher makes two keypairs per run: the coordinator's (server) and one shared by the run's agents (client).
Agents receive theirs over the ssh channel (stdin, never the command line: `ps` would show it) or, in no-ssh mode,
from a 0600 key file. The coordinator's ZAP handler accepts exactly the run's client public key: a peer without it
cannot complete the handshake, so it can neither join, send gradients nor read weights.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator


@dataclass
class RunKeys:
    server_public: str
    server_secret: str  # stays with the coordinator; never sent to agents
    client_public: str
    client_secret: str

    @classmethod
    def generate(cls) -> RunKeys:
        sp, ss = zmq.curve_keypair()
        cp, cs = zmq.curve_keypair()
        return cls(sp.decode(), ss.decode(), cp.decode(), cs.decode())

    def for_agents(self) -> dict:
        """What an agent needs: the server's public key and the client keypair."""
        return {"server_public": self.server_public, "client_public": self.client_public,
                "client_secret": self.client_secret}

    def write_agent_file(self, path: str | Path, run: str | None = None) -> Path:
        """The agents' keys; `run` ties the file to one start of one run (an agent given another run id waits for
        its own file instead of using this one: a requeued job's earlier start left it)."""
        return _write_private(path, self.for_agents() | ({"run": run} if run is not None else {}))

    def write_coordinator_file(self, path: str | Path) -> Path:
        """All four keys (the server secret too): for `launch --keys`, e.g. from a Kubernetes Secret."""
        return _write_private(path, asdict(self))

    @classmethod
    def read_coordinator_file(cls, path: str | Path) -> RunKeys:
        names = [f.name for f in fields(cls)]
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise SystemExit(f"{path}: cannot read the coordinator key file ({e})") from None
        keys = _parse_keys(text, names, f"{path}: not a dptrain coordinator key file (make one with `dptrain keys`)")
        return cls(**{k: keys[k] for k in names})


def _write_private(path: str | Path, data: dict) -> Path:
    """JSON in a file only this user can read (0600 from its creation on), written atomically: a reader (an agent
    polling for the file on a shared filesystem) sees no file or the whole file, never a part of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # one a killed writer of this pid left: O_EXCL makes the new one 0600 for sure
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_launch_failure(path: str | Path, run: str, reason: str) -> Path:
    """No-ssh mode, the launcher failed before it wrote the keys: the key file says so, so that agents waiting for
    it stop at once with the launcher's reason instead of waiting out --wait-keys-s."""
    return _write_private(path, {"run": run, "failed": reason})


def make_key_files(out: str | Path) -> int:
    """`dptrain keys --out DIR`: a run's key pairs made in advance (a Kubernetes Secret, a scheduler's spool):
    DIR/coordinator.json for `launch --keys`, DIR/agent.json for `agent --keys`; both 0600."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = RunKeys.generate()
    for p in (keys.write_coordinator_file(out / "coordinator.json"), keys.write_agent_file(out / "agent.json")):
        print(p)
    return 0


def read_agent_keys(text: str, source: str) -> dict:
    return _parse_keys(text, ["server_public", "client_public", "client_secret"],
                       f"{source}: not a dptrain CURVE key file")


def _parse_keys(text: str, names: list[str], what: str) -> dict:
    """The JSON key file `text` holding every key of `names` (40-character Z85); else SystemExit(`what (why)`)."""
    try:
        keys = json.loads(text)
        if not isinstance(keys, dict) or not all(isinstance(keys.get(k), str) and len(keys[k]) == 40
                                                 for k in names):
            raise ValueError("missing or malformed keys")
        return keys
    except ValueError as e:
        raise SystemExit(f"{what} ({e})") from None


class _OnlyRunKey:
    def __init__(self, allowed: str):
        self.allowed = allowed.encode()

    def callback(self, domain, key) -> bool:
        return key == self.allowed


class CurveServer:
    """Applies the server side to a socket and runs the ZAP authenticator for its context."""

    def __init__(self, ctx: zmq.Context, keys: RunKeys):
        self.keys = keys
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve_callback("*", credentials_provider=_OnlyRunKey(keys.client_public))

    def __call__(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.keys.server_secret.encode()
        sock.curve_publickey = self.keys.server_public.encode()
        sock.curve_server = True

    def stop(self) -> None:
        self.auth.stop()


def client_setup(agent_keys: dict):
    """A function that makes a socket a CURVE client of the run's coordinator."""
    def setup(sock: zmq.Socket) -> None:
        sock.curve_serverkey = agent_keys["server_public"].encode()
        sock.curve_publickey = agent_keys["client_public"].encode()
        sock.curve_secretkey = agent_keys["client_secret"].encode()
    return setup
