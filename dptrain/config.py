"""Run configuration: dataclasses with a comment per field, loaded from TOML, overridden by flags.

Precedence: dataclass defaults < `--config FILE.toml` < `--section.key=value` overrides (and the short flags such as
`--lr`, which are aliases for a section key). Every value is type-checked against the field's type; unknown keys are
errors that name the key. The resolved config is written to the run folder as `config.toml`.
"""
from __future__ import annotations

import dataclasses
import signal
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

CONV_ALGOS = ("auto", "im2col", "winograd")  # model.conv_algo (nn/conv.py)


@dataclass
class DataConfig:
    path: str = "data/synth"  # dataset: a folder with one sub-folder per class, or a .tgz/.tar of one
    image_size: int = 64  # images are resized to image_size x image_size RGB
    center_crop: int = 0  # centre crop of this many pixels before resizing (0: none; 150 suits raw LFW)
    min_images_per_class: int = 2  # classes with fewer images are dropped
    max_classes: int = 0  # keep only the N largest classes (0: all)
    val_fraction: float = 0.2  # fraction of each class held out (classes with one image stay in training)
    augment: bool = True  # random horizontal flip + small translation, seeded per sample
    # largest translation as a fraction of image_size (1/32: 2 px at 64, 1 px at 32). Chosen by epochs to a target
    # (docs/time-to-accuracy.md): the old fixed 4 px (1/8 of a 32 px image) slowed small images down.
    shift: float = 0.03125
    # largest translation in pixels. Unset (or set to -1) it is derived, round(shift * image_size), and follows
    # both; set to N >= 0 (configs from before `shift`; a run's config.toml, which records the pixels used) it wins.
    max_shift: int = -1
    cache_dir: str = ""  # where decoded uint8 caches are kept ("": ~/.cache/dptrain)
    # an image that would decode to more pixels is skipped and named, never decoded (data/guard.py; a JPEG counts at
    # its DCT draft's scale): 32 MP keeps a 24-30 MP camera image as PNG/TIFF and bounds one decode to ~100 MB RGB
    max_image_pixels: int = 32_000_000
    # a file or archive member larger than this is skipped and named, never read (a .tgz member is read whole)
    max_file_mb: float = 64.0

    def __post_init__(self):
        self.__dict__["_shift_derived"] = self.max_shift < 0
        self._derive_shift()

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if "_shift_derived" not in self.__dict__:  # still in __init__
            return
        if name == "max_shift":
            self.__dict__["_shift_derived"] = value < 0
        if name in ("max_shift", "image_size", "shift"):
            self._derive_shift()

    def _derive_shift(self) -> None:
        if self._shift_derived:
            self.__dict__["max_shift"] = int(round(self.shift * self.image_size))


@dataclass
class ModelConfig:
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])  # channels of the conv-BN-ReLU-maxpool blocks
    res_width: int = 256  # output channels of the residual block (0: no residual block)
    hidden: int = 512  # width of the hidden Linear + BN1D + ReLU (0: none)
    # running = (1 - m) * running + m * batch (PyTorch's convention; its default is 0.1). 0.3: the running statistics
    # follow the weights of the last few steps, so the model evaluated at an epoch's end is the one trained (same
    # training; fewer epochs to a validation target on few steps per epoch, same final accuracy:
    # docs/time-to-accuracy.md)
    bn_momentum: float = 0.3
    bn_eps: float = 1e-5  # PyTorch's
    # conv/Linear weights: "pytorch" = PyTorch's defaults (kaiming_uniform a=sqrt(5): U(+-1/sqrt(fan_in)) weights
    # and biases), which reached targets in fewer epochs (docs/time-to-accuracy.md); "he" = He-normal
    # (std sqrt(2 / fan_in)) with zero biases, the classifier PyTorch's uniform (the default before)
    init: str = "pytorch"
    zero_init_residual: bool = False  # the residual block's last BN gamma starts at 0 (the block starts as identity)
    # 3x3 stride-1 convolutions: "im2col" (the reference: im2col + one GEMM), "winograd" (F(2x2, 3x3): 2.25x fewer
    # multiplies, float32 error within a few ulps of im2col's; nn/winograd.py) or "auto" (Winograd where the layer's
    # shape says it pays; by shape only, the same in every process: nn/conv.py choose_algo)
    conv_algo: str = "auto"


@dataclass
class TrainConfig:
    out: str = "runs/default"  # run folder: config.toml, metrics.jsonl, summary.json, checkpoints
    epochs: int = 10  # passes over the training split (early stopping or --stop-at-step may end it sooner)
    batch_size: int = 64  # global batch size (split across workers in distributed runs)
    lr: float = 0.05  # peak learning rate after warmup
    min_lr: float = 0.0  # floor of the cosine schedule
    warmup_epochs: float = 1.0  # linear warmup length, converted to steps with the real steps per epoch
    momentum: float = 0.9  # SGD momentum, PyTorch's convention: v = momentum * v + g; w -= lr * v
    weight_decay: float = 5e-4  # L2: weight_decay * w is added to the gradient of conv/Linear weights
    decay_bn_and_bias: bool = False  # apply weight decay to BN gamma/beta and biases too
    clip_norm: float = 5.0  # global L2 gradient-norm clip (0: off)
    # cross-entropy against (1 - s) onehot + s / classes (label smoothing; 0: the plain loss). The loss logged is
    # this one, so with s > 0 it does not fall to 0
    label_smoothing: float = 0.0
    # Evaluate (and keep as best, predict, export) a moving average of the weights whose time constant is this many
    # epochs (ema.py; 0: the live weights). Not with the mesh data plane across hosts (ema.py says why).
    ema_epochs: float = 0.0
    patience: int = 5  # early stop after this many epochs without a better val accuracy (0: never)
    seed: int = 0  # initialisation, train/val split, batch order and augmentation: a run is a function of it
    drop_last: bool = True  # drop the last incomplete batch of an epoch
    eval_batch_size: int = 0  # validation batch per process (0: the per-worker training batch, whose buffers exist)
    steps_per_epoch: int = 0  # cap steps per epoch (0: whole epoch), for quick runs
    progress: bool = True  # tqdm progress bars
    checkpoint_every_steps: int = 0  # also save `last` every this many steps (0: at epoch ends only)
    keep_checkpoints: int = 0  # with checkpoint_every_steps: also keep the last K of them as step-NNNNNNNN.npz
    # a signal (e.g. "USR1": Slurm's --signal before the time limit) that means "preempted": finish the step, save
    # `last`, exit with EXIT_PREEMPTED (75) so a requeued job resumes with --resume auto. "": none besides INT/TERM
    checkpoint_signal: str = ""
    tensorboard: bool = True  # TensorBoard events in RUN/tensorboard/ (needs the tensorboard extra: tensorboardX)
    # With more than one thread per process, shorten OpenBLAS's post-GEMM busy-wait so the non-GEMM kernels'
    # threads get the cores (nn/threads.py); false leaves OpenBLAS as configured.
    short_blas_spin: bool = True
    # Batch-invariant mode (distributed/invariant.py): blocks of this many samples, each gradient summed exactly,
    # so 1 process and `launch --workers N --bn sync` give bitwise the same weights for any N. 0: off (normal mode)
    batch_invariant_block: int = 0


@dataclass
class DistConfig:
    workers: int = 2  # worker processes on this host (launch)
    bn: str = "stats"  # "stats": per-shard normalisation, global running stats; "sync": exact SyncBatchNorm
    on_worker_failure: str = "abort"  # "abort" or "continue" (re-shard over the survivors)
    # under "continue": start a replacement for a lost worker (one host) or host agent (ssh), at most this many
    # times over the run; it takes part from the step after it is ready (the shards are re-cut)
    max_worker_restarts: int = 0
    bind: str = "127.0.0.1"  # interface the coordinator listens on
    port: int = 0  # 0: pick a free port
    heartbeat_interval_s: float = 1.0  # seconds between liveness messages each way (coordinator <-> peers)
    heartbeat_misses: int = 5  # a peer silent for this many intervals is dead
    step_timeout_s: float = 120.0  # a worker late by this much on one step is declared stuck
    blas_threads: int = 0  # BLAS threads per worker (0: cores // workers, at least 1)
    pin_cores: bool = False  # pin each worker to a core with psutil
    # workers' scheduler time slice in ms (Linux 6.12+, distributed/timeslice.py): -1 = auto (100 when the workers
    # outnumber the physical cores and bn = "stats", else the kernel's default), 0 = the kernel's default
    timeslice_ms: float = -1.0
    transport: str = "shm"  # "shm": bulk arrays through shared memory on one host; "socket": raw frames
    # With shm: "workers" = each worker sums its slice of every gradient slot and applies SGD to that slice (the
    # coordinator only decides); "coordinator" = the coordinator sums and updates alone. The same bits either way.
    update: str = "workers"
    wire_dtype: str = "float32"  # dtype of gradients sent between hosts ("float16" halves the bytes)
    # Across hosts: "mesh" = the agents reduce-scatter their gradients among themselves, each updates its slice and
    # all-gathers the weights (bytes per link flat in the number of hosts); "star" = through the coordinator.
    plane: str = "mesh"
    # mesh: every this many steps the hosts' slices of weights and momentum become the coordinator's state and every
    # host's weights are checked against it (a checksum); a lost host costs at most this many steps redone
    sync_every: int = 10
    # mesh: the hidden Linear's weight gradient (89 % of the default model's bytes) is not reduce-scattered: each host
    # sends the owners its samples' inputs and output gradients of that layer (B_h x (16384 + 512) floats instead of
    # 16384 x 512) and each owner computes its rows of dW = X^T dY over the whole batch (mesh.py)
    factored: bool = True
    # mesh, with factored: who updates that Linear's weights. "owners": each host computes and updates its slice's
    # rows and all-gathers them (as every other weight); "replicated": every host gets every host's factors, computes
    # the whole dW (per owner's rows, each owner's GEMM: every host the same bits) and updates all of W itself, so W never
    # travels; "auto": replicated while the global batch is small enough to pay (mesh_layout.replicate_pays)
    factor_update: str = "auto"
    # mesh, across hosts: what protects the host-to-host gradients and weights. "aes-gcm": those sockets carry no
    # CURVE and every message is sealed with AES-256-GCM (AES-NI: ~1.8x fewer CPU-seconds per byte than CURVE) under
    # per-plane, per-direction keys the coordinator hands out over its CURVE link (distributed/bulk.py,
    # docs/security.md); "curve": ZeroMQ CURVE like every other link (its handshake also keeps strangers from
    # connecting at all). The coordinator's link keeps CURVE either way
    bulk_cipher: str = "aes-gcm"
    # mesh, aes-gcm: threads that seal and open the bulk frames side by side (OpenSSL runs without Python's lock);
    # 0 = auto: min(4, this host's cores); 1 = on the agent's own thread, as CURVE's one I/O thread does
    cipher_threads: int = 0
    # mesh: a host's workers start the next step while the last step's all-gather still arrives, each layer's
    # forward waiting for its own weights (the convolutions' come first; the hidden Linear's while they run). False:
    # the agent takes the whole all-gather before it hands out the next step. The same bits either way
    gather_overlap: bool = True
    timeline: str = ""  # write a Chrome-trace JSON of every phase to this file
    # a folder for this host's shared-memory segments instead of /dev/shm (also $DPTRAIN_SHM_DIR): a larger tmpfs or
    # a local disk when /dev/shm is too small, e.g. a container's 64 MB (docs/containers.md)
    shm_dir: str = ""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self) -> Config:
        if self.dist.bn not in ("stats", "sync"):
            raise ValueError(f"dist.bn must be 'stats' or 'sync', got {self.dist.bn!r}")
        if self.dist.on_worker_failure not in ("abort", "continue"):
            raise ValueError(f"dist.on_worker_failure must be 'abort' or 'continue', got {self.dist.on_worker_failure!r}")
        if self.dist.max_worker_restarts < 0:
            raise ValueError(f"dist.max_worker_restarts must be >= 0, got {self.dist.max_worker_restarts}")
        if self.dist.transport not in ("shm", "socket"):
            raise ValueError(f"dist.transport must be 'shm' or 'socket', got {self.dist.transport!r}")
        if self.dist.update not in ("workers", "coordinator"):
            raise ValueError(f"dist.update must be 'workers' or 'coordinator', got {self.dist.update!r}")
        if self.train.checkpoint_signal and not hasattr(signal, "SIG" + self.train.checkpoint_signal.upper()
                                                          .removeprefix("SIG")):
            raise ValueError(f"train.checkpoint_signal {self.train.checkpoint_signal!r} is not a signal name "
                             f"(e.g. USR1)")
        if self.dist.factor_update not in ("auto", "owners", "replicated"):
            raise ValueError("dist.factor_update must be 'auto', 'owners' or 'replicated', "
                             f"got {self.dist.factor_update!r}")
        if self.dist.cipher_threads < 0:
            raise ValueError(f"dist.cipher_threads must be >= 0 (0: auto), got {self.dist.cipher_threads}")
        if self.dist.bulk_cipher not in ("curve", "aes-gcm"):
            raise ValueError(f"dist.bulk_cipher must be 'curve' or 'aes-gcm', got {self.dist.bulk_cipher!r}")
        if self.dist.plane not in ("mesh", "star"):
            raise ValueError(f"dist.plane must be 'mesh' or 'star', got {self.dist.plane!r}")
        if self.dist.wire_dtype not in ("float32", "float16"):
            raise ValueError(f"dist.wire_dtype must be 'float32' or 'float16', got {self.dist.wire_dtype!r}")
        if self.model.init not in ("he", "pytorch"):
            raise ValueError(f"model.init must be 'he' or 'pytorch', got {self.model.init!r}")
        if self.model.conv_algo not in CONV_ALGOS:
            raise ValueError(f"model.conv_algo must be one of {', '.join(CONV_ALGOS)}, got {self.model.conv_algo!r}")
        if self.data.max_image_pixels < 1 or self.data.max_file_mb <= 0:
            raise ValueError("data.max_image_pixels and data.max_file_mb must be > 0")
        if not 0 <= self.data.shift < 0.5:
            raise ValueError(f"data.shift is a fraction of the image size in [0, 0.5), got {self.data.shift}")
        for name in ("epochs", "batch_size", "image_size"):
            sec = self.train if hasattr(self.train, name) else self.data
            if getattr(sec, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0 <= self.train.label_smoothing < 1:
            raise ValueError(f"train.label_smoothing must be in [0, 1), got {self.train.label_smoothing}")
        if not 0 <= self.train.ema_epochs <= 1000:
            raise ValueError(f"train.ema_epochs is a time constant in epochs, 0 (off) to 1000, got "
                             f"{self.train.ema_epochs}")
        if self.train.batch_invariant_block < 0:
            raise ValueError("train.batch_invariant_block must be >= 0 (0: off)")
        if self.train.batch_invariant_block and -(-self.train.batch_size // self.train.batch_invariant_block) > 4096:
            raise ValueError("train.batch_invariant_block: at most 4096 blocks per batch (their exact sum is int64)")
        if self.train.batch_invariant_block and self.dist.wire_dtype != "float32":
            raise ValueError("train.batch_invariant_block needs dist.wire_dtype = float32 (gradients travel exact)")
        if self.dist.workers < 0:
            raise ValueError("dist.workers must be >= 0")
        return self


def _check(value, typ, key: str):
    """Coerce/verify `value` against the annotation `typ`; int is accepted for float fields."""
    origin = typing.get_origin(typ)
    if origin is list:
        (inner,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise TypeError(f"{key}: expected a list, got {value!r}")
        return [_check(v, inner, key) for v in value]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is bool and not isinstance(value, bool):
        raise TypeError(f"{key}: expected true/false, got {value!r}")
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise TypeError(f"{key}: expected {typ.__name__}, got {value!r}")
    return value


def _parse_text(text: str, typ, key: str):
    """Parse a command-line string for a field of type `typ` (TOML literal syntax for lists/bools)."""
    if typ is str:
        return text
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        raise ValueError(f"{key}: cannot parse {text!r} as {getattr(typ, '__name__', typ)}") from None
    return _check(value, typ, key)


def apply(cfg: Config, table: dict, source: str) -> Config:
    """Merge a {section: {key: value}} mapping into cfg, type-checking every key."""
    for section, values in table.items():
        if section not in {f.name for f in dataclasses.fields(cfg)}:
            raise KeyError(f"{source}: unknown section [{section}]")
        sec = getattr(cfg, section)
        hints = typing.get_type_hints(type(sec))
        if not isinstance(values, dict):
            raise TypeError(f"{source}: [{section}] must be a table")
        for key, value in values.items():
            if key not in hints:
                raise KeyError(f"{source}: unknown key {section}.{key}")
            setattr(sec, key, _check(value, hints[key], f"{section}.{key}"))
    return cfg


def load(path: str | Path | None = None, overrides: dict[str, str] | None = None) -> Config:
    """Defaults, then a TOML file, then `section.key -> text` overrides."""
    cfg = Config()
    if path:
        with open(path, "rb") as f:
            try:
                table = tomllib.load(f)
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:  # e.g. a truncated or damaged file
                raise ValueError(f"{path}: not a readable TOML config ({e})") from None
        apply(cfg, table, str(path))
    for dotted, text in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        sec = getattr(cfg, section, None)
        hints = typing.get_type_hints(type(sec)) if dataclasses.is_dataclass(sec) else {}
        if key not in hints:
            raise KeyError(f"unknown config key {dotted!r}")
        setattr(sec, key, _parse_text(text, hints[key], dotted))
    return cfg.validate()


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(table: dict) -> Config:
    return apply(Config(), table, "checkpoint").validate()


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def dumps(cfg: Config) -> str:
    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)
