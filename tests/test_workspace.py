"""nn/workspace.py: a buffer per tag that grows only; smaller requests are views of the same memory."""
import numpy as np

from dptrain.nn.workspace import Workspace


def test_smaller_requests_reuse_the_memory_and_larger_ones_grow_it():
    ws = Workspace()
    a = ws.get("t", (32, 8, 8, 4), np.float32)
    assert ws.get("t", (32, 8, 8, 4), np.float32) is a  # the same shape: the same view, no work
    b = ws.get("t", (3, 8, 8, 4), np.float32)  # an evaluation's short last batch: the front of the same memory
    assert np.shares_memory(a, b) and b.flags.c_contiguous and b.shape == (3, 8, 8, 4)
    c = ws.get("t", (32, 8, 8, 4), np.float32)
    assert np.shares_memory(a, c)
    d = ws.get("t", (64, 8, 8, 4), np.float32)  # larger: new memory
    assert not np.shares_memory(a, d) and d.shape == (64, 8, 8, 4)
    e = ws.get("t", (10,), np.uint8)  # another dtype over the same bytes
    assert e.dtype == np.uint8 and np.shares_memory(d, e)
    assert ws.get("t", (0, 4), np.float32).size == 0


def test_zero_new_buffers_are_zero_after_a_shape_change():
    """Callers write only the interior of a zero_new buffer (padding borders): a view of reused memory in another
    shape must be zero again."""
    ws = Workspace()
    a = ws.get("p", (4, 6, 6, 2), np.float32, zero_new=True)
    assert not a.any()
    a[...] = 7.0
    assert (ws.get("p", (4, 6, 6, 2), np.float32, zero_new=True) == 7.0).all()  # same shape: kept as written
    b = ws.get("p", (2, 5, 5, 2), np.float32, zero_new=True)
    assert not b.any()
    c = ws.get("p", (4, 6, 6, 2), np.float32, zero_new=True)
    assert not c.any()
