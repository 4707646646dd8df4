"""Hostfiles, `-H` host lists, `--include/--exclude` filters, and rank assignment.

Hostfile (the format OpenMPI, Horovod and DeepSpeed share)::

    # comment lines and trailing comments are ignored, so are blank lines
    node-a slots=4        # 4 worker slots on node-a
    alice@node-b slots=2  # ssh as alice; the host is node-b
    node-c                # no slots= means 1 slot
    node-d:2              # Horovod's -H spelling is accepted in a file too: 2 slots
    node-e slots = 3      # spaces around "=" are fine (OpenMPI allows them)

A host may appear once; a second line for the same host (compared without the
``user@`` part) is an error naming both line numbers. Any other bad line raises
`HostfileError("FILE:LINE: reason")`. Only ``slots=`` is understood (OpenMPI's
``max_slots=`` is an error, not silently ignored). Not supported: ``host:port`` (the
ssh port is a launcher flag, because ``host:N`` already means N slots) and IPv6
literals.

`-H` / ``--hosts``: ``parse_hosts("a:4,b:4,c")`` -> a with 4 slots, b with 4, c with 1.

Filters, DeepSpeed style, on bare host names (no ``user@``, since ``@`` separates hosts)::

    --include "node-a@node-b"      only these hosts, all their slots
    --include "node-a:0,2@node-b"  slots 0 and 2 of node-a, all of node-b
    --exclude "node-c@node-a:3"    drop node-c, and slot 3 of node-a

Include and exclude together is an error, as is a host or slot the list does not
have. A host left with no slots is dropped. Host order always stays the order of the
hostfile, so the same file gives the same ranks whatever the filter's order.

`-np N` (mpirun, horovodrun): N workers in all, `first_slots` fills the hosts in order up to N (``-np 6 -H a:4,b:4``
-> a:4, b:2; a host left with none is dropped); more than the hosts' slots is an error.

Ranks pack each host first: host order as given, ``local_rank`` 0..k-1 on each host.
`HostSlots.slot_ids` keeps which of the host's original slots survived a filter
(for core pinning); ``local_rank`` is the position among them, not the slot id.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

_HOST = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"(?:(?P<user>[A-Za-z0-9._-]+)@)?(?P<host>{_HOST})")
_COLON_RE = re.compile(r"(?P<name>[^:\s]+):(?P<n>\S+)")


class HostfileError(ValueError):
    """A hostfile, host list or filter that cannot be used; the message says where."""


@dataclass(frozen=True)
class HostSlots:
    """One host: the ssh target (`host`, may be ``user@host``), its slot count and slot ids."""
    host: str
    slots: int
    slot_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.slot_ids:  # default: all of 0..slots-1
            object.__setattr__(self, "slot_ids", tuple(range(self.slots)))
        if self.slots < 1 or len(self.slot_ids) != self.slots:
            raise HostfileError(f"{self.host}: {self.slots} slots but slot ids {self.slot_ids}")

    @property
    def hostname(self) -> str:
        """The host without ``user@``: what filters and duplicate checks compare."""
        return self.host.rpartition("@")[2]


class RankEntry(NamedTuple):
    rank: int
    host: str
    local_rank: int


def _host(text: str, where: str) -> str:
    if not _HOST_RE.fullmatch(text):
        raise HostfileError(f"{where}: bad host name {text!r}")
    return text


def _count(text: str, where: str) -> int:
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise HostfileError(f"{where}: slot count must be a positive integer, got {text!r}")
    return int(text)


def _parse_entry(tokens: list[str], where: str) -> HostSlots:
    """One hostfile line's tokens: ``host``, ``host slots=N`` or ``host:N``."""
    m = _COLON_RE.fullmatch(tokens[0])
    if m:
        if len(tokens) > 1:
            raise HostfileError(f"{where}: use either 'host:N' or 'host slots=N', not both")
        return HostSlots(_host(m["name"], where), _count(m["n"], where))
    host, slots = _host(tokens[0], where), 1
    if len(tokens) > 2:
        raise HostfileError(f"{where}: expected 'host slots=N', got {' '.join(tokens)!r}")
    if len(tokens) == 2:
        key, eq, value = tokens[1].partition("=")
        if key != "slots" or not eq:
            raise HostfileError(f"{where}: unknown option {tokens[1]!r} (only slots=N)")
        slots = _count(value, where)
    return HostSlots(host, slots)


def _no_duplicates(entries: list[tuple[HostSlots, str]]) -> list[HostSlots]:
    first: dict[str, str] = {}
    for hs, where in entries:
        if hs.hostname in first:
            raise HostfileError(f"{where}: duplicate host {hs.hostname!r} (first at {first[hs.hostname]})")
        first[hs.hostname] = where
    if not entries:
        raise HostfileError("no hosts")
    return [hs for hs, _ in entries]


def parse_hostfile_text(text: str, source: str = "<hostfile>") -> list[HostSlots]:
    """Parse hostfile text; `source` names it in error messages."""
    entries = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        # OpenMPI also accepts "slots = 4"; join the "=" so both spellings are one token
        tokens = re.sub(r"\s*=\s*", "=", line.split("#", 1)[0]).split()
        if tokens:
            where = f"{source}:{lineno}"
            entries.append((_parse_entry(tokens, where), where))
    if not entries:
        raise HostfileError(f"{source}: no hosts")
    return _no_duplicates(entries)


def parse_hostfile(path: str | Path) -> list[HostSlots]:
    """Read and parse a hostfile."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise HostfileError(f"{path}: cannot read hostfile ({e})") from None
    return parse_hostfile_text(text, str(path))


def parse_hosts(spec: str) -> list[HostSlots]:
    """Parse a ``-H a:4,b:4,c`` list (no ``:N`` means 1 slot)."""
    entries = []
    for j, item in enumerate(spec.split(","), start=1):
        where = f"-H item {j}"
        item = item.strip()
        if not item:
            raise HostfileError(f"{where}: empty host in {spec!r}")
        name, colon, n = item.partition(":")
        entries.append((HostSlots(_host(name, where), _count(n, where) if colon else 1), where))
    return _no_duplicates(entries)


def parse_filter(spec: str) -> dict[str, tuple[int, ...] | None]:
    """``"a:0,2@b"`` -> ``{"a": (0, 2), "b": None}``; None means every slot of that host."""
    out: dict[str, tuple[int, ...] | None] = {}
    for part in spec.split("@"):
        part = part.strip()
        name, colon, ids = part.partition(":")
        where = f"filter {spec!r}"
        if not re.fullmatch(_HOST, name):
            raise HostfileError(f"{where}: bad host name {name!r}")
        if name in out:
            raise HostfileError(f"{where}: host {name!r} named twice")
        if not colon:
            out[name] = None
            continue
        if not re.fullmatch(r"[0-9]+(,[0-9]+)*", ids):
            raise HostfileError(f"{where}: slots of {name!r} must be integers like 0,2, got {ids!r}")
        slots = tuple(int(s) for s in ids.split(","))
        if len(set(slots)) != len(slots):
            raise HostfileError(f"{where}: slots of {name!r} listed twice")
        out[name] = slots
    return out


def filter_hosts(hosts: list[HostSlots], include: str | None = None,
                 exclude: str | None = None) -> list[HostSlots]:
    """Apply a DeepSpeed-style ``--include`` or ``--exclude`` (not both) to `hosts`."""
    if include and exclude:
        raise HostfileError("--include and --exclude are mutually exclusive")
    spec = include or exclude
    if not spec:
        return list(hosts)
    wanted = parse_filter(spec)
    by_name = {hs.hostname: hs for hs in hosts}
    for name, ids in wanted.items():
        if name not in by_name:
            raise HostfileError(f"filter names host {name!r}, which is not in the host list")
        bad = sorted(set(ids or ()) - set(by_name[name].slot_ids))
        if bad:
            raise HostfileError(f"filter names slots {bad} of {name!r}, which has slots "
                                f"{list(by_name[name].slot_ids)}")
    out = []
    for hs in hosts:
        if hs.hostname in wanted:
            ids = wanted[hs.hostname]
            chosen = set(hs.slot_ids if ids is None else ids)
        else:
            chosen = set()
        keep = [s for s in hs.slot_ids if (s in chosen) == bool(include)]
        if keep:
            out.append(HostSlots(hs.host, len(keep), tuple(keep)))
    if not out:
        raise HostfileError(f"filter {spec!r} leaves no slots")
    return out


def first_slots(hosts: list[HostSlots], total: int, source: str = "the hosts") -> list[HostSlots]:
    """The first `total` slots of `hosts`, host by host in order (mpirun's and horovodrun's -np: a total, not per
    host). A host keeps its first slot ids; a host left with none is dropped."""
    have = sum(h.slots for h in hosts)
    if total < 1:
        raise HostfileError(f"-np {total}: the number of workers must be at least 1")
    if total > have:
        raise HostfileError(f"-np {total} is more than the {have} slots of {source} "
                            f"({', '.join(f'{h.hostname}:{h.slots}' for h in hosts)})")
    out, left = [], total
    for h in hosts:
        if left <= 0:
            break
        take = min(h.slots, left)
        out.append(h if take == h.slots else HostSlots(h.host, take, h.slot_ids[:take]))
        left -= take
    return out


def bind_address(name: str) -> str:
    """--bind as ZeroMQ can bind it: an IPv4 address, `*` or one of this machine's interface names stay as they are;
    a host name becomes its (first) IPv4 address, which is also what the agents are told to connect to."""
    if name == "*" or name in {n for _, n in socket.if_nameindex()}:
        return name
    try:
        return str(ipaddress.IPv4Address(name))
    except ValueError:
        pass
    try:
        ipaddress.IPv6Address(name.strip("[]"))
    except ValueError:
        pass
    else:
        raise HostfileError(f"--bind {name}: IPv6 addresses are not supported (give an IPv4 address or host name)")
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise HostfileError(f"--bind {name}: cannot resolve this host name to an IPv4 address ({why})") from None
    return infos[0][4][0]


def rank_bases(slots: list[int]) -> list[int]:
    """The first global rank of each host, filling each host before the next: the one place ranks are assigned
    (the coordinator tells each agent its base; the executor shards a batch over the same ranks)."""
    return [sum(slots[:i]) for i in range(len(slots))]


def assign_ranks(hosts: list[HostSlots]) -> list[RankEntry]:
    """Rank table ``[(rank, host, local_rank)]`` (for display and pinning), from `rank_bases`."""
    bases = rank_bases([hs.slots for hs in hosts])
    return [RankEntry(base + local_rank, hs.host, local_rank)
            for hs, base in zip(hosts, bases) for local_rank in range(hs.slots)]
