"""Builders shared by the tests: a Config from a plain dict, and a small model with its ParamStore."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dptrain import config
from dptrain.config import Config, ModelConfig
from dptrain.nn.model import Model, build_model
from dptrain.nn.params import ParamStore

TINY_TOML = Path(__file__).resolve().parent.parent / "configs" / "tiny.toml"  # the small model the run tests train


def make_config(values: dict | None = None, toml: str | Path | None = None) -> Config:
    """The defaults, then the TOML file `toml` if given (e.g. configs/tiny.toml), then `values`, validated.

    values: {"section.key": value} with Python values, type-checked like the file's
    (`{"model.widths": [4, 8], "train.progress": False, "train.out": tmp_path}`; paths may be Path objects).
    """
    table: dict[str, dict] = {}
    for dotted, value in (values or {}).items():
        section, _, key = dotted.partition(".")
        table.setdefault(section, {})[key] = os.fspath(value) if isinstance(value, os.PathLike) else value
    return config.apply(config.load(toml), table, "make_config").validate()


def small_model(mcfg: ModelConfig, classes: int = 5, size: int = 16, dtype=np.float32, seed: int = 0,
                jitter: float = 0.0) -> tuple[Model, ParamStore]:
    """build_model on a fresh ParamStore initialised from `seed`; jitter > 0 adds N(0, jitter) noise to every
    parameter, so that BN's gamma is not 1 nor beta 0."""
    store = ParamStore(dtype)
    model = build_model(mcfg, classes, size, store, rng=np.random.default_rng(seed))
    if jitter:
        store.params[...] += np.random.default_rng(seed + 1).normal(0, jitter, store.num_params).astype(dtype)
    return model, store


def on_each_thread_count(compute, counts=(1, 2, 3)):
    """compute() once with each nn thread count in `counts`, BLAS pinned to one thread (so that only the split of
    elementwise work changes); returns (the results in that order, the thread counts whose pool was handed blocks:
    evidence the work was split)."""
    from threadpoolctl import threadpool_limits

    from dptrain.nn import threads as threads_mod

    results, handed = [], set()
    with threadpool_limits(1, user_api="blas"):
        for n in counts:
            prev = threads_mod.set_threads(n)
            try:
                pool = threads_mod._pool
                if pool is not None:
                    submit = pool.submit
                    pool.submit = lambda *a, _n=n, _s=submit, **k: (handed.add(_n), _s(*a, **k))[1]
                results.append(compute())
            finally:
                threads_mod.set_threads(prev)
    return results, handed

