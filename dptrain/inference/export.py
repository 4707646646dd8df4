"""`dptrain export`: a checkpoint's network for other tools, as ONNX, a PyTorch state_dict or safetensors.

    dptrain export --checkpoint runs/demo/best.npz --format onnx        --out model.onnx
    dptrain export --checkpoint runs/demo/best.npz --format torch       --out model.pt    (+ model.pt.json)
    dptrain export --checkpoint runs/demo/best.npz --format safetensors --out model.safetensors

Every format carries what is needed to use the network: the class names (index k of the output is class_names[k])
and the preprocessing of training (`preprocessing()`: RGB, centre crop of `center_crop` source pixels (0: the whole
image) resized to `image_size` square with Pillow's antialiased BILINEAR, then x = (pixel / 255 - mean) / std), so
inputs are made as `dptrain predict` makes them. BatchNorm is in eval mode (running statistics).

ONNX (needs the `onnx` package; written from our weights with onnx.helper, no PyTorch): input `input`, float32
(N, 3, S, S) **NCHW**, already normalised; outputs `logits` and `probabilities` (softmax), (N, K); the batch
dimension is free. Why NCHW although dptrain computes in NHWC: ONNX's Conv, MaxPool and BatchNormalization are
defined on NCHW only, so an NHWC graph would be a Transpose around every layer or a leading Transpose to NCHW, and
NCHW is what every ONNX consumer (onnxruntime, TensorRT, OpenCV's dnn, torchvision-style preprocessing code)
feeds. The graph is built NCHW throughout: conv weights go (kh, kw, C, F) -> (F, C, kh, kw); before the flatten a
Transpose to NHWC makes the features come in dptrain's order (as torch_ref's twin does), so Linear weights are
used as stored ((in, out), Gemm without transB). BatchNorm stays BatchNormalization nodes with the running
statistics, one initializer per dptrain tensor and named like it (`block1.conv.w`, `hidden.bn.running_var`):
onnxruntime folds them into the convolutions itself when it loads the graph. Opset 17, IR version 8 (onnxruntime
>= 1.14 runs it). metadata_props: `class_names` (JSON list), `preprocessing` (JSON), `input_layout` (NCHW),
`dptrain_config` (the training config, JSON), `source` (checkpoint file name and SHA-256).

torch (needs PyTorch): `torch.save` of the state_dict of `torch_ref.build_torch_model(cfg.model, K, S)`, which
`load_state_dict(..., strict=True)` accepts (tensors in PyTorch layouts; num_batches_tracked 0, unused with BN
momentum set). The sidecar OUT.json holds what build_torch_model needs (`model` config, `num_classes`, `image_size`) and the
class names and preprocessing; the state_dict file stays a plain one (torch.load(..., weights_only=True)).

safetensors (needs the `safetensors` package, numpy API; no PyTorch): every parameter and BN statistic by its
dptrain name, in dptrain's layouts (conv (kh, kw, C, F), Linear (in, out), NHWC flatten order), float32; metadata
as for ONNX, plus `weights_layout`. `load_safetensors` (and so `dptrain predict/eval --checkpoint X.safetensors`)
rebuilds the NumPy model from it: a checkpoint of the weights alone (no momentum), without pickle or zip.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .. import __version__, config as config_mod
from ..data.augment import MEAN, STD
from ..fsutil import atomic_write
from ..nn.layers import (
    AvgPool2D,
    BatchNorm,
    BNPoolReLU,
    Conv2D,
    Flatten,
    Linear,
    MaxPool2D,
    ReLU,
    ResidualBlock,
    Sequential,
)
from ..nn.torch_ref import build_torch_model, load_weights, to_torch_layout
from .model_file import load_model, require

FORMATS = ("onnx", "torch", "safetensors")
ONNX_OPSET = 17
ONNX_IR_VERSION = 8  # the IR of opset 17; a newer IR than the runtime knows is refused at load
WEIGHTS_LAYOUT = "dptrain NHWC: conv (kh, kw, C, F), linear (in, out), flatten in (h, w, c) order; float32"


def preprocessing(cfg: config_mod.Config) -> dict:
    """What an input image goes through before the network, as training did it (see data/decode.py, augment.py)."""
    return {"image_size": cfg.data.image_size, "center_crop": cfg.data.center_crop, "channels": "RGB",
            "resize": "Pillow Image.resize BILINEAR (antialiased) of the centred center_crop x center_crop box "
                      "(clamped to the image; 0 = the whole image, squashed to a square)",
            "scale": 1 / 255, "mean": [MEAN] * 3, "std": [STD] * 3, "formula": "x = (pixel / 255 - mean) / std"}


def _metadata(cfg, class_names: list[str], checkpoint_path) -> dict[str, str]:
    with open(checkpoint_path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"class_names": json.dumps(class_names), "preprocessing": json.dumps(preprocessing(cfg)),
            "dptrain_config": json.dumps(config_mod.to_dict(cfg)),
            "source": json.dumps({"checkpoint": Path(checkpoint_path).name, "sha256": digest})}


class _OnnxGraph:
    """Emits ONNX nodes for our layers (NCHW), their tensors as initializers named like ours."""

    def __init__(self, helper, numpy_helper):
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.initializers, self.count = [], [], 0

    def tensor(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        self.count += 1
        out = f"{op}_{self.count}"
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def emit(self, layer, x: str) -> str:
        """The ONNX form of `layer` applied to the tensor named x; returns its output's name."""
        if isinstance(layer, Sequential):
            for sub in layer.layers:
                x = self.emit(sub, x)
            return x
        if isinstance(layer, ResidualBlock):
            y = self.emit(layer.main, x)
            s = x if layer.short is None else self.emit(layer.short, x)
            return self.emit(layer.relu, self.node("Add", [y, s]))
        if isinstance(layer, BNPoolReLU):  # what it computes: BN, max-pool, ReLU
            pooled = self.node("MaxPool", [self.emit(layer.bn, x)], kernel_shape=[layer.k] * 2,
                               strides=[layer.stride] * 2)
            return self.node("Relu", [pooled])
        if isinstance(layer, Conv2D):
            k = layer.w.shape[0]
            inputs = [x, self.tensor(layer.w.name, to_torch_layout(layer.w.data))]  # (F, C, kh, kw)
            if layer.b is not None:
                inputs.append(self.tensor(layer.b.name, layer.b.data))
            return self.node("Conv", inputs, kernel_shape=[k, k], strides=[layer.stride] * 2, pads=[layer.pad] * 4)
        if isinstance(layer, BatchNorm):  # eval mode: running statistics; (N, C) or (N, C, H, W)
            stats = [self.tensor(t.name, t.data) for t in (layer.gamma, layer.beta, layer.running_mean,
                                                            layer.running_var)]
            return self.node("BatchNormalization", [x, *stats], epsilon=float(layer.eps))
        if isinstance(layer, ReLU):
            return self.node("Relu", [x])
        if isinstance(layer, MaxPool2D):  # AvgPool2D is a subclass
            op = "AveragePool" if isinstance(layer, AvgPool2D) else "MaxPool"
            return self.node(op, [x], kernel_shape=[layer.k] * 2, strides=[layer.stride] * 2)
        if isinstance(layer, Flatten):  # features in our (h, w, c) order, so Linear weights need no permutation
            return self.node("Flatten", [self.node("Transpose", [x], perm=[0, 2, 3, 1])], axis=1)
        if isinstance(layer, Linear):
            inputs = [x, self.tensor(layer.w.name, layer.w.data)]  # (in, out): Gemm's B as is
            if layer.b is not None:
                inputs.append(self.tensor(layer.b.name, layer.b.data))
            return self.node("Gemm", inputs)
        raise NotImplementedError(f"dptrain export: no ONNX form for layer {type(layer).__name__}")


def onnx_model(model, cfg, class_names: list[str], metadata: dict[str, str]):
    """The onnx.ModelProto of `model` (see the module docstring), checked by onnx.checker."""
    onnx = require("onnx", "--format onnx")
    from onnx import TensorProto, helper, numpy_helper

    S, K = cfg.data.image_size, len(class_names)
    g = _OnnxGraph(helper, numpy_helper)
    g.emit(model.net, "input")
    g.nodes[-1].output[0] = "logits"
    g.nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="Softmax", axis=1))
    graph = helper.make_graph(
        g.nodes, "dptrain", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, S, S])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", K]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", K])],
        initializer=g.initializers)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="dptrain",
                          producer_version=__version__, ir_version=ONNX_IR_VERSION,
                          doc_string=f"dptrain CNN, {K} classes; input NCHW float32 normalised RGB, see "
                                     f"metadata_props 'preprocessing' and 'class_names'")
    helper.set_model_props(m, dict(metadata, input_layout="NCHW"))
    onnx.checker.check_model(m, full_check=True)
    return m


def torch_state_dict(model, cfg, class_names: list[str]):
    """The state_dict of torch_ref's twin with our weights and BN statistics (PyTorch layouts)."""
    require("torch", "--format torch")

    net = build_torch_model(cfg.model, len(class_names), cfg.data.image_size).eval()
    load_weights(net, model.store)
    return net.state_dict()


def safetensors_tensors(model) -> dict[str, np.ndarray]:
    """Every parameter and BN statistic of `model` by its dptrain name, in dptrain's layouts."""
    store = model.store
    return {t.name: np.ascontiguousarray(t.data) for t in store.param_list + store.buffer_list}


def export(checkpoint_path: str | os.PathLike, fmt: str, out: str | os.PathLike) -> dict:
    """Write `checkpoint_path`'s network to `out` in format `fmt`; returns a summary (format, out, bytes, ...)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    model, cfg, class_names = load_model(checkpoint_path)
    metadata = _metadata(cfg, class_names, checkpoint_path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"format": fmt, "out": str(out), "num_classes": len(class_names),
               "num_params": int(model.store.num_params)}
    if fmt == "onnx":
        blob = onnx_model(model, cfg, class_names, metadata).SerializeToString()
        atomic_write(out, lambda f: f.write(blob))
        summary.update(input="input: float32 (N, 3, S, S) NCHW, normalised", outputs=["logits", "probabilities"])
    elif fmt == "torch":
        torch = require("torch", "--format torch")
        state = torch_state_dict(model, cfg, class_names)
        atomic_write(out, lambda f: torch.save(state, f))
        side = out.with_name(out.name + ".json")
        info = {"builder": "dptrain.nn.torch_ref.build_torch_model", "model": config_mod.to_dict(cfg)["model"],
                "num_classes": len(class_names), "image_size": cfg.data.image_size, "input_layout": "NCHW",
                **{k: json.loads(v) for k, v in metadata.items()}}
        atomic_write(side, lambda f: f.write(json.dumps(info, indent=1).encode()))
        summary["sidecar"] = str(side)
    else:
        st = require("safetensors.numpy", "--format safetensors")
        blob = st.save(safetensors_tensors(model), metadata=dict(metadata, weights_layout=WEIGHTS_LAYOUT))
        atomic_write(out, lambda f: f.write(blob))
    summary["bytes"] = out.stat().st_size
    return summary
