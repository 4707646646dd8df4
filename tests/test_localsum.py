"""localsum.LocalSum: one host's workers summing SyncBatchNorm moments in shared memory. Ranks are threads here
over one pair of arrays (the launcher's are shared-memory segments): every rank gets the coordinator's sum (zeros,
then rank order) bit for bit over successive calls and steps; a rank waits for the round's ranks only, and not for
a stamp of an older attempt; a STEP or STOP from the coordinator while waiting raises Preempted."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from dptrain.distributed import localsum, protocol as P
from dptrain.distributed.localsum import LocalSum
from dptrain.distributed.peer import Preempted

pytestmark = pytest.mark.numerics  # run a second time on the AVX2 kernels: make test-avx2


class FakeLink:
    def __init__(self, step=0, attempt=0, inbox=None):
        self.step, self.attempt, self.inbox = step, attempt, list(inbox or [])

    def poll_once(self):
        return self.inbox.pop(0) if self.inbox else None


def arrays(slots=4, width=7):
    return np.zeros((2, slots, width)), np.zeros(slots, np.int64)


def coordinator_sum(parts):
    total = np.zeros(parts[0].size)
    for p in parts:
        total += p
    return total


@pytest.mark.timeout(30)
def test_every_rank_gets_the_coordinators_sum_bitwise():
    rows, seen = arrays()
    ranks = [0, 2, 3]  # rank 1 sits this round out
    rng = np.random.default_rng(0)
    data = {(s, c, r): rng.standard_normal(1 + c % 7) * 10.0 ** rng.integers(-8, 8)
            for s in range(3) for c in range(6) for r in ranks}
    got, errors = {}, []

    def rank(r):
        try:
            for s in range(3):
                link = FakeLink(step=s)
                ls = LocalSum(rows, seen, r, link)
                for c in range(6):
                    got[(s, c, r)] = ls.allreduce(c, data[(s, c, r)], ranks)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=rank, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors and len(got) == len(data)
    for s in range(3):
        for c in range(6):
            want = coordinator_sum([data[(s, c, r)] for r in ranks])
            for r in ranks:
                assert np.array_equal(got[(s, c, r)], want)


def test_an_older_attempts_stamp_does_not_count():
    rows, seen = arrays()
    seen[1] = localsum.stamp(5, 0, 0)  # rank 1 arrived in attempt 0 and died; rank 0 is in attempt 1
    stop = P.Message(P.Kind.STOP, "run", 5, 0, {"reason": "test"}, {})
    with pytest.raises(Preempted) as e:
        LocalSum(rows, seen, 0, FakeLink(step=5, attempt=1, inbox=[None] * 20 + [stop])).allreduce(
            0, np.ones(3), [0, 1])
    assert e.value.msg.kind is P.Kind.STOP


def test_a_new_step_preempts_a_wait():
    rows, seen = arrays()
    step = P.Message(P.Kind.STEP, "run", 4, 0, {"attempt": 1}, {})
    with pytest.raises(Preempted) as e:
        LocalSum(rows, seen, 2, FakeLink(step=3, inbox=[step])).allreduce(1, np.ones(5), [0, 2])
    assert e.value.msg is step and seen[2] == localsum.stamp(3, 0, 1)


def test_stamps_grow_with_step_attempt_and_call():
    assert localsum.stamp(0, 0, 0) > 0
    assert localsum.stamp(1, 0, 0) > localsum.stamp(0, 4000, 60000) > localsum.stamp(0, 3, 9) > localsum.stamp(0, 3, 8)


def test_only_on_x86_64(monkeypatch):
    """Other architectures may make the stamp visible before the row: there the coordinator keeps summing."""
    for machine, ok in (("x86_64", True), ("AMD64", True), ("aarch64", False), ("arm64", False), ("ppc64le", False)):
        monkeypatch.setattr(localsum.platform, "machine", lambda m=machine: m)
        assert localsum.supported() is ok


@pytest.mark.timeout(90)
def test_a_launch_sums_in_shared_memory_or_through_the_coordinator(tiny_data, tmp_path, monkeypatch):
    """The same run both ways (3 workers, sync BN, one epoch): the same bits; summary.json says who summed."""
    import json

    from distutil import arrays as run_arrays, launch_inproc, tiny_cfg
    kw = dict(dist__workers=3, dist__bn="sync", train__epochs=1, train__batch_size=31)
    assert launch_inproc(tiny_cfg(tiny_data, tmp_path / "shm", **kw)) == 0
    monkeypatch.setattr(localsum, "supported", lambda: False)
    assert launch_inproc(tiny_cfg(tiny_data, tmp_path / "coord", **kw)) == 0
    shm, coord = (json.loads((tmp_path / d / "summary.json").read_text())["bn_sums"] for d in ("shm", "coord"))
    assert shm == "workers (shared memory)" and coord.startswith("coordinator (") and " 0 served" not in coord
    a, b = run_arrays(tmp_path / "shm"), run_arrays(tmp_path / "coord")
    for k in ("params", "velocity", "buffers"):
        assert np.array_equal(a[k], b[k]), k
