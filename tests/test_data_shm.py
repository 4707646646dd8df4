"""SharedImageCache against the OS: the segment is visible in /dev/shm while the creator holds it, readers get
read-only views of the same bytes, a spawned child that attaches and exits does not unlink it (the Python 3.11
resource_tracker bug), and nothing is left after unlink.

Children started by multiprocessing share the creator's resource tracker, so the bug only shows with independent
interpreters (what `dptrain launch` starts): those are run with subprocess, and a control run shows that a plain
SharedMemory attach there does destroy the segment on 3.11, so the test can tell the difference."""
import multiprocessing as mp
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from dptrain.data.shm import PREFIX, SharedImageCache

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm (Linux)")


def _child_reads(spec, q):
    cache = SharedImageCache.attach(spec)
    q.put(int(cache.array.astype(np.int64).sum()))
    cache.close()  # then the process exits: its resource tracker must not unlink the segment


@pytest.mark.timeout(60)
def test_child_attach_and_exit_leaves_segment_then_unlink_leaves_nothing():
    images = np.random.default_rng(0).integers(0, 256, (50, 16, 16, 3), dtype=np.uint8)
    cache = SharedImageCache.create(images)
    path = f"/dev/shm/{cache.name}"
    try:
        assert cache.name.startswith(PREFIX) and os.path.exists(path)
        ctx = mp.get_context("spawn")  # its own resource tracker, as a separately started worker would have
        q = ctx.Queue()
        procs = [ctx.Process(target=_child_reads, args=(cache.spec(), q)) for _ in range(2)]
        for p in procs:
            p.start()
        try:
            sums = [q.get(timeout=30) for _ in procs]
            for p in procs:
                p.join(timeout=30)
                assert p.exitcode == 0
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        assert sums == [int(images.astype(np.int64).sum())] * 2
        assert os.path.exists(path)
        code = (f"from dptrain.data.shm import SharedImageCache as S; r = S.attach({cache.spec()!r}); "
                "print(int(r.array.astype('int64').sum())); r.close()")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
        assert int(out.stdout) == sums[0]
        time.sleep(0.2)  # a tracker would unlink right after the child's exit
        assert os.path.exists(path)
        again = SharedImageCache.attach(cache.spec())
        assert np.array_equal(again.array, images)
        again.close()
    finally:
        cache.close()
        cache.unlink()
    assert not os.path.exists(path)


def test_reader_is_readonly_and_shares_memory():
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    with SharedImageCache.create(images) as owner:
        reader = SharedImageCache.attach(owner.spec())
        assert np.array_equal(reader.array, images) and not reader.array.flags.writeable
        with pytest.raises(ValueError):
            reader.array[0, 0, 0, 0] = 7
        with pytest.raises(ValueError):
            reader.array.flags.writeable = True  # the mapping itself is read-only
        with pytest.raises(PermissionError):
            reader.unlink()
        view = reader.array[1]  # a view outliving close() must not crash
        reader.close()
        assert view.sum() == images[1].sum()
        mine = owner.array[0]
        owner.close()  # the creator's own view must survive close() too; unlink still works after it
        assert mine.sum() == images[0].sum()
        with pytest.raises(ValueError, match="needs"):
            SharedImageCache.attach(dict(owner.spec(), shape=[3, 4, 4, 3]))
    assert not os.path.exists(f"/dev/shm/{owner.name}")
    with pytest.raises(FileNotFoundError):
        SharedImageCache.attach(owner.spec())


@pytest.mark.timeout(60)
@pytest.mark.skipif(sys.version_info >= (3, 13), reason="the bug is fixed with track=False in 3.13")
def test_control_plain_sharedmemory_attach_in_independent_process_unlinks():
    cache = SharedImageCache.create(np.ones(10, np.uint8))
    try:
        code = f"from multiprocessing import shared_memory as sm; sm.SharedMemory(name={cache.name!r}).close()"
        subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=True)
        for _ in range(50):  # the child's tracker unlinks asynchronously after it exits
            if not os.path.exists(f"/dev/shm/{cache.name}"):
                break
            time.sleep(0.05)
        assert not os.path.exists(f"/dev/shm/{cache.name}")
    finally:
        cache.close()
        cache.unlink()  # tolerates the name being gone
