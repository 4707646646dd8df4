"""dptrain: data-parallel CNN training on CPU clusters, in NumPy, over ZeroMQ."""
__version__ = "0.1.0"
