"""Data: discovery (folder / .tgz), split, decode + resize with an on-disk cache, shared-memory image cache,
per-sample seeded augmentation, the sampler, and synthetic LFW-like faces."""
from .augment import make_batch, normalize
from .dataset import Dataset, load_dataset, load_folder_for_eval
from .sampler import Sampler, shard, shard_bounds
from .shm import SharedImageCache

__all__ = ["Dataset", "load_dataset", "load_folder_for_eval", "make_batch", "normalize", "Sampler", "shard",
           "shard_bounds", "SharedImageCache"]
