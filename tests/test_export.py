"""`dptrain export` against our own model: onnxruntime's logits on the synthetic set's images (decoded as
training decodes them) within 1e-4 of ours, and an outside consumer that only reads the ONNX metadata (plain
Pillow + NumPy preprocessing) predicting like `dptrain predict`; the torch state_dict loaded strictly into
torch_ref's twin giving the same logits; the safetensors file round-tripping bit for bit and usable as a
checkpoint."""
import json

import numpy as np
import pytest
from PIL import Image
from trained import train_tiny

from dptrain import checkpoint, cli
from dptrain.data.augment import make_batch
from dptrain.data.dataset import load_folder_for_eval
from dptrain.inference.export import export
from dptrain.inference.model_file import load_model
from dptrain.inference.predict import predict


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data, ckpt, cfg = train_tiny(root)
    model, _, class_names = load_model(ckpt)
    ds = load_folder_for_eval(data, class_names, cfg.data.image_size, cfg.data.center_crop,
                              cache_dir=str(root / "cache"), progress=False)
    x = make_batch(ds.images, np.arange(len(ds.images)))  # (N, S, S, 3) float32, normalised
    return data, ckpt, cfg, class_names, x, model.forward(x, train=False)


def test_onnx_runs_in_onnxruntime_like_our_model(trained, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    data, ckpt, cfg, class_names, x, logits = trained
    out = tmp_path / "model.onnx"
    summary = export(ckpt, "onnx", out)
    assert summary["bytes"] == out.stat().st_size > 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "input" and inp.shape[1:] == [3, 32, 32] and isinstance(inp.shape[0], str)
    assert [o.name for o in sess.get_outputs()] == ["logits", "probabilities"]
    nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    got, probs = sess.run(None, {"input": nchw})
    np.testing.assert_allclose(got, logits, rtol=0, atol=1e-4)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    one, _ = sess.run(None, {"input": nchw[:1]})  # the batch dimension is free
    np.testing.assert_allclose(one, logits[:1], rtol=0, atol=1e-4)

    m = onnx.load(str(out))
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["class_names"]) == class_names and meta["input_layout"] == "NCHW"
    pre = json.loads(meta["preprocessing"])
    assert (pre["image_size"], pre["center_crop"], pre["mean"], pre["std"]) == (32, 36, [0.5] * 3, [0.25] * 3)
    assert json.loads(meta["dptrain_config"])["model"]["widths"] == [8, 16]
    model, _, _ = load_model(ckpt)
    ours = {t.name for t in model.store.param_list + model.store.buffer_list}
    assert {t.name for t in m.graph.initializer} == ours  # one initializer per tensor, named like ours


def _outside_consumer(sess, meta: dict, path) -> np.ndarray:
    """What a user of the ONNX file alone would write: the metadata's recipe with plain Pillow and NumPy."""
    pre = json.loads(meta["preprocessing"])
    im = Image.open(path).convert("RGB")
    w, h = im.size
    c = min(pre["center_crop"], w, h) if pre["center_crop"] else 0
    box = ((w - c) / 2, (h - c) / 2, (w + c) / 2, (h + c) / 2) if c else None
    im = im.resize((pre["image_size"],) * 2, Image.Resampling.BILINEAR, box=box)
    a = (np.asarray(im, np.float32) / 255 - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
    return sess.run(["probabilities"], {"input": a.transpose(2, 0, 1)[None].astype(np.float32)})[0][0]


def test_onnx_metadata_is_enough_to_use_the_model(trained, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    data, ckpt, *_ = trained
    export(ckpt, "onnx", tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    files = sorted(data.glob("*/*.jpg"))[::7]
    ref = predict(ckpt, files, top_k=1, progress=False)
    for f, k, q in zip(files, ref.top_index[:, 0], ref.top_prob[:, 0]):
        p = _outside_consumer(sess, meta, f)
        assert json.loads(meta["class_names"])[p.argmax()] == ref.class_names[k]
        assert p.max() == pytest.approx(q, abs=1e-4)


def test_torch_state_dict_loads_strictly_into_the_twin(trained, tmp_path):
    torch = pytest.importorskip("torch")
    from dptrain.config import ModelConfig
    from dptrain.nn.torch_ref import build_torch_model

    data, ckpt, cfg, class_names, x, logits = trained
    out = tmp_path / "model.pt"
    summary = export(ckpt, "torch", out)
    info = json.loads((tmp_path / "model.pt.json").read_text())
    assert summary["sidecar"] == str(tmp_path / "model.pt.json")
    assert info["class_names"] == class_names and info["preprocessing"]["center_crop"] == 36
    net = build_torch_model(ModelConfig(**info["model"]), info["num_classes"], info["image_size"])
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    net.eval()
    with torch.no_grad():
        got = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    np.testing.assert_allclose(got, logits, rtol=0, atol=1e-4)


def test_safetensors_round_trip(trained, tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open

    data, ckpt, cfg, class_names, x, logits = trained
    out = tmp_path / "model.safetensors"
    export(ckpt, "safetensors", out)
    tensors = st.load_file(str(out))
    model, _, _ = load_model(ckpt)
    store = model.store
    assert sorted(tensors) == sorted(t.name for t in store.param_list + store.buffer_list)
    for t in store.param_list + store.buffer_list:
        assert tensors[t.name].dtype == np.float32 and np.array_equal(tensors[t.name], t.data), t.name
    assert tensors["block1.conv.w"].shape == (3, 3, 3, 8) and tensors["classifier.w"].shape == (32, 6)
    with safe_open(str(out), framework="numpy") as f:
        meta = f.metadata()
    assert json.loads(meta["class_names"]) == class_names and "NHWC" in meta["weights_layout"]
    assert json.loads(meta["preprocessing"])["image_size"] == 32

    back, cfg2, names2 = load_model(out)  # the export is itself a checkpoint for predict / eval
    assert names2 == class_names and cfg2.model == cfg.model and cfg2.data.center_crop == 36
    np.testing.assert_array_equal(back.store.params, store.params)
    np.testing.assert_array_equal(back.store.buffers, store.buffers)
    np.testing.assert_array_equal(back.forward(x, train=False), logits)
    files = sorted(data.glob("*/*.jpg"))[:5]
    a, b = predict(ckpt, files, progress=False), predict(out, files, progress=False)
    np.testing.assert_array_equal(a.top_index, b.top_index)
    np.testing.assert_array_equal(a.top_prob, b.top_prob)

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(out.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match="bad.safetensors"):
        load_model(bad)
    foreign = tmp_path / "foreign.safetensors"
    st.save_file({"w": np.zeros(3, np.float32)}, str(foreign))
    with pytest.raises(checkpoint.CheckpointError, match="not a dptrain"):
        load_model(foreign)


def test_cli_and_errors(trained, tmp_path, capsys, monkeypatch):
    data, ckpt, *_ = trained
    out = tmp_path / "sub" / "m.safetensors"
    assert cli.main(["export", "--checkpoint", str(ckpt), "--format", "safetensors", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(out) and summary["bytes"] == out.stat().st_size
    with pytest.raises(SystemExit):
        cli.main(["export", "--checkpoint", str(ckpt), "--format", "keras", "--out", str(out)])
    with pytest.raises(SystemExit, match="missing.npz"):
        cli.main(["export", "--checkpoint", str(tmp_path / "missing.npz"), "--format", "onnx",
                  "--out", str(tmp_path / "x.onnx")])
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)  # as if the package were not installed
    with pytest.raises(SystemExit, match=r"needs the onnx package .*\[export\]"):
        export(ckpt, "onnx", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
