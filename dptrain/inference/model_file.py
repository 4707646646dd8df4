"""A trained model from disk: a checkpoint (`.npz`, written by train/launch) or a `dptrain export --format
safetensors` file, rebuilt as (model, cfg, class_names) with its weights and BN running statistics loaded."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .. import checkpoint, config as config_mod, install_hint
from ..checkpoint import CheckpointError
from ..nn.model import build_model
from ..nn.params import ParamStore


def require(module: str, what: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(f"dptrain: {what} needs the {module.split('.')[0]} package "
                         f"({install_hint('export')})") from None


def empty_model(cfg: config_mod.Config, num_classes: int):
    """The network `cfg` describes on a float32 ParamStore, allocated, its weights to be overwritten."""
    # The rng only fills weights that the caller overwrites; it is needed to allocate the store.
    return build_model(cfg.model, num_classes, cfg.data.image_size, ParamStore(np.float32),
                       rng=np.random.default_rng(0))


def load_model(checkpoint_path: str | Path):
    """(model, cfg, class_names) rebuilt from a checkpoint, weights and BN running statistics loaded. The weights
    are the moving average when the run kept one (train.ema_epochs: the model its validation accuracy measured).

    A `.safetensors` file written by `dptrain export` is read too (load_safetensors).
    """
    if str(checkpoint_path).endswith(".safetensors"):
        return load_safetensors(checkpoint_path)
    arrays, meta = checkpoint.load(checkpoint_path)
    try:
        cfg = config_mod.from_dict(meta["config"])
        class_names = list(meta["class_names"])
    except (KeyError, TypeError, ValueError) as e:
        raise checkpoint.CheckpointError(f"{checkpoint_path}: unusable config/class names in meta ({e})") from None
    model = empty_model(cfg, len(class_names))
    store = model.store
    weights = "ema_params" if "ema_params" in arrays else "params"  # the model that was evaluated (ema.py)
    for name, dst in ((weights, store.params), ("buffers", store.buffers)):
        if arrays[name].shape != dst.shape:
            raise checkpoint.CheckpointError(f"{checkpoint_path}: {name} has shape {arrays[name].shape}, the model "
                                             f"its config describes needs {dst.shape}")
        dst[...] = arrays[name]
    return model, cfg, class_names


def load_safetensors(path: str | os.PathLike):
    """(model, cfg, class_names) from a `dptrain export --format safetensors` file. Errors (ValueError) name it."""
    st = require("safetensors", "reading a .safetensors model")
    try:
        with st.safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        cfg = config_mod.from_dict(json.loads(meta["dptrain_config"]))
        class_names = list(json.loads(meta["class_names"]))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # safetensors raises its own SafetensorError, not a ValueError
        raise CheckpointError(f"{path}: not a dptrain safetensors export ({type(e).__name__}: {e})") from None
    model = empty_model(cfg, len(class_names))
    store = model.store
    mine = {t.name: t for t in store.param_list + store.buffer_list}
    if set(mine) != set(tensors):
        raise CheckpointError(f"{path}: tensors differ from the model its config describes: "
                              f"{sorted(set(mine) ^ set(tensors))[:10]}")
    for name, t in mine.items():
        if tensors[name].shape != t.shape:
            raise CheckpointError(f"{path}: {name} has shape {tensors[name].shape}, the model needs {t.shape}")
        t.data[...] = tensors[name]
    return model, cfg, class_names
