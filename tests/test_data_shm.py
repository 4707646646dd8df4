"""SharedImageCache against the OS: the segment is visible in /dev/shm while the creator holds it, readers get
read-only views of the same bytes, a spawned child that attaches and exits does not unlink it (the Python 3.11
resource_tracker bug), and nothing is left after unlink."""
import multiprocessing as mp
import os

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
