"""config.py against the dataclass defaults and hand-written expectations: TOML values land in the right fields,
`--section.key=value` overrides beat the file, type errors and unknown keys name the offending key, and
dumps() -> load() gives back an equal Config (for every field, including lists, bools, floats and quoted strings)."""
import dataclasses

import pytest

from dptrain import config as C


def _write(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_validate():
    cfg = C.load()
    assert cfg == C.Config() and cfg.train.lr == 0.05 and cfg.model.widths == [32, 64, 128]


def test_toml_load_and_int_for_float(tmp_path):
    p = _write(tmp_path, """
[data]
image_size = 32
augment = false
[model]
widths = [8, 16]
[train]
lr = 1        # an int is fine for a float field
epochs = 7
[dist]
bn = "sync"
""")
    cfg = C.load(p)
    assert cfg.data.image_size == 32 and cfg.data.augment is False and cfg.model.widths == [8, 16]
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.train.epochs == 7
    assert cfg.dist.bn == "sync"
    assert cfg.train.batch_size == C.TrainConfig().batch_size  # untouched keys keep defaults


def test_overrides_beat_the_file(tmp_path):
    p = _write(tmp_path, "[train]\nlr = 0.5\nepochs = 3\n")
    cfg = C.load(p, {"train.lr": "0.01", "model.widths": "[4, 8, 16]", "data.augment": "false",
                     "train.out": "runs/x y", "dist.bn": "sync"})
    assert cfg.train.lr == 0.01 and cfg.train.epochs == 3
    assert cfg.model.widths == [4, 8, 16] and cfg.data.augment is False
    assert cfg.train.out == "runs/x y"  # strings are taken verbatim, no quoting needed


@pytest.mark.parametrize("overrides,key", [
    ({"train.epochs": "2.5"}, "train.epochs"),
    ({"train.epochs": "true"}, "train.epochs"),  # bool is not an int
    ({"train.lr": "fast"}, "train.lr"),
    ({"data.augment": "1"}, "data.augment"),
    ({"model.widths": "8"}, "model.widths"),
    ({"model.widths": "[8, 'a']"}, "model.widths"),
])
def test_override_type_errors_name_the_key(overrides, key):
    with pytest.raises((TypeError, ValueError)) as e:
        C.load(None, overrides)
    assert key in str(e.value)


@pytest.mark.parametrize("text,key", [
    ("[train]\nepochs = 'ten'\n", "train.epochs"),
    ("[train]\nprogress = 1\n", "train.progress"),
    ("[model]\nwidths = [8, 1.5]\n", "model.widths"),
    ("[data]\nimage_size = 3.0\n", "data.image_size"),
])
def test_file_type_errors_name_the_key(tmp_path, text, key):
    with pytest.raises(TypeError) as e:
        C.load(_write(tmp_path, text))
    assert key in str(e.value)


def test_unknown_keys_and_sections(tmp_path):
    with pytest.raises(KeyError, match="train.lrr"):
        C.load(_write(tmp_path, "[train]\nlrr = 0.1\n"))
    with pytest.raises(KeyError, match="trian"):
        C.load(_write(tmp_path, "[trian]\nlr = 0.1\n", "b.toml"))
    with pytest.raises(KeyError, match="train.lrr"):
        C.load(None, {"train.lrr": "0.1"})
    with pytest.raises(KeyError, match="nosection.lr"):
        C.load(None, {"nosection.lr": "0.1"})
    with pytest.raises(KeyError, match="'lr'"):
        C.load(None, {"lr": "0.1"})  # a key without a section
    with pytest.raises(TypeError, match=r"\[train\]"):
        C.load(_write(tmp_path, "train = 3\n", "c.toml"))


@pytest.mark.parametrize("overrides,match", [
    ({"dist.bn": "batch"}, "dist.bn"), ({"train.epochs": "0"}, "epochs"), ({"data.image_size": "0"}, "image_size"),
    ({"dist.transport": "udp"}, "dist.transport"), ({"dist.workers": "-1"}, "dist.workers"),
])
def test_validate(overrides, match):
    with pytest.raises(ValueError, match=match):
        C.load(None, overrides)


def test_dumps_load_round_trip(tmp_path):
    cfg = C.load(None, {"model.widths": "[3, 5]", "train.lr": "1e-4", "train.min_lr": "0", "data.augment": "false",
                        "train.out": 'odd "path" \\ with\\backslash', "dist.heartbeat_interval_s": "0.1",
                        "train.weight_decay": "5e-4", "data.cache_dir": ""})
    p = _write(tmp_path, C.dumps(cfg), "config.toml")
    back = C.load(p)
    assert back == cfg
    for sec in dataclasses.fields(cfg):  # same types too (1e-4 stays a float, [3, 5] a list of ints)
        for f in dataclasses.fields(getattr(cfg, sec.name)):
            a, b = getattr(getattr(cfg, sec.name), f.name), getattr(getattr(back, sec.name), f.name)
            assert type(a) is type(b), f"{sec.name}.{f.name}"
    assert C.from_dict(C.to_dict(cfg)) == cfg  # the checkpoint path


def test_float_edge_values_round_trip(tmp_path):
    cfg = C.Config()
    cfg.train.lr = 1e-300
    cfg.train.min_lr = 0.1 + 0.2  # repr keeps every digit
    assert C.load(_write(tmp_path, C.dumps(cfg))) == cfg


def test_shift_is_a_fraction_of_the_image_and_old_pixel_configs_win(tmp_path):
    """data.shift (1/32 of image_size by default) sets the translation; a config from before it, with max_shift in
    pixels, keeps its pixels; a run's config.toml records the pixels used."""
    assert C.Config().data.max_shift == C.load().data.max_shift == 2  # 1/32 of 64 px
    assert C.load(None, {"data.image_size": "32"}).data.max_shift == 1
    assert C.load(None, {"data.image_size": "32", "data.shift": "0"}).data.max_shift == 0
    cfg = C.load(_write(tmp_path, "[data]\nimage_size = 32\nmax_shift = 4\n"))
    assert cfg.data.max_shift == 4  # an explicit pixel count wins
    cfg.data.max_shift = -1
    assert cfg.data.max_shift == 1  # derived again
    cfg.data.image_size = 128
    assert cfg.data.max_shift == 4  # and follows image_size
    with pytest.raises(ValueError, match="data.shift"):
        C.load(None, {"data.shift": "0.6"})
    with pytest.raises(ValueError, match="model.init"):
        C.load(None, {"model.init": "xavier"})
