"""The training loop, once: `Trainer` owns every piece of state and asks an executor for gradients.

`dptrain train` plugs in `LocalExecutor` (executors.py: this process computes the gradient, no sockets: the
reference the distributed run's mathematics is tested against; `--replay-workers N` plugs in replay.py's executor,
which makes a distributed run's sums in its order: bitwise that run); `dptrain launch` plugs in the distributed
executor, which shards the same global batch over worker processes. Everything else — sampler, schedule, clipping,
SGD, BatchNorm running statistics, validation, early stopping, checkpoints, metrics (metrics.py), summary.json — is
this file, for both.

A step, whoever computes it:
    indices = global batch k of epoch e (pure function of seed, e, k); lr = lr(k)    <- the Trainer decides
    executor.train_step(indices, epoch, k, lr): ∇ mean loss over the batch, reduced; norm = ‖g‖₂ → clip at
        train.clip_norm → SGD at lr on the store's weights and the optimizer's velocity; BN moments summed
    BN running stats from the batch's exact moments; metrics; checkpoints                <- the Trainer again

The seam runs one way: the Trainer calls an `Executor`; an executor never sees the Trainer, only the store and the
optimizer it was given (whose arrays the Trainer checkpoints between steps).
"""
from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np

from . import checkpoint, config as config_mod, log
from .board import Board, preload as preload_board
from .config import Config
from .data.dataset import Dataset, load_dataset
from .data.sampler import Sampler
from .distributed.invariant import InvariantExecutor
from .ema import WeightAverage, decay_for
from .executors import Executor, ExecutorFailure, LocalExecutor, StepInterrupted
from .fsutil import atomic_link, atomic_write
from .metrics import MetricsFiles, Progress
from .nn.model import build_model
from .nn.params import ParamStore
from .optim import lr_at, sgd_for
from .saver import BackgroundWriter

STOP_GRACE_S = 10.0  # after the first Ctrl-C / SIGTERM the running step gets this long before it is abandoned


EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped by train.checkpoint_signal with `last` saved; run again


class Trainer:
    """Owns weights, momentum, BN running stats, schedule position, early-stopping state and the run folder."""

    def __init__(self, cfg: Config, dataset: Dataset, store_factory=None):
        self.cfg, self.ds = cfg, dataset
        self.out = Path(cfg.train.out)
        self.log = log.get()
        t = cfg.train
        rng = np.random.default_rng(t.seed)
        self.store = ParamStore(np.float32)
        self.model = build_model(cfg.model, len(dataset.class_names), cfg.data.image_size, self.store, rng=rng)
        if store_factory is not None:  # e.g. move the flat buffers into shared memory (launch.py)
            store_factory(self.store, self.model, dataset)
        self.opt = sgd_for(self.store, t)
        self.sampler = Sampler(dataset.train_idx, t.batch_size, t.seed, t.drop_last, t.steps_per_epoch)
        self.steps_per_epoch = self.sampler.num_steps()
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(dataset.train_idx)} training images are fewer than one batch of {t.batch_size} "
                             f"(lower --batch-size or set train.drop_last=false)")
        self.total_steps = self.steps_per_epoch * t.epochs
        self.warmup_steps = int(round(t.warmup_epochs * self.steps_per_epoch))
        self.ema = WeightAverage(self.store.params, decay_for(t.ema_epochs, self.steps_per_epoch)) \
            if t.ema_epochs > 0 else None
        # Schedule position and early-stopping state: all of it goes into the checkpoint.
        self.epoch, self.step_in_epoch, self.step = 0, 0, 0
        self.best_val_acc, self.best_epoch, self.bad_epochs = -1.0, -1, 0
        self.epoch_sums = [0.0, 0, 0, 0.0]  # loss_sum, correct, count, compute seconds of the running epoch
        self.epochs_run = 0
        self.stop_requested = False
        self.preempted = False  # stopped by train.checkpoint_signal: the exit code says "requeue me"
        self.restarts = 0  # how many times `launch --max-restarts` started this run again
        self.board: Board | None = None  # TensorBoard events, during fit()
        if cfg.train.tensorboard:  # now, before any worker starts: fit() must not stall a second in an import while
            preload_board()  # workers wait for heartbeat answers (seconds on a loaded machine: every rank lost)
        name = cfg.train.checkpoint_signal.upper().removeprefix("SIG")
        self.preempt_signal = getattr(signal, "SIG" + name) if name else None
        self.executor: Executor | None = None  # during fit()
        self.unsaved: OSError | None = None  # the last checkpoint write failed (a full disk): fit() ends non-zero
        self.metrics = MetricsFiles(self.out)  # metrics.jsonl and metrics.csv
        self.saved_at: tuple | None = None  # _position() of the last last.npz written
        self.writer = BackgroundWriter()  # checkpoints are written while the next steps run

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {"config": config_mod.to_dict(self.cfg), "class_names": self.ds.class_names,
                "fingerprint": self.ds.fingerprint, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "step": self.step, "best_val_acc": self.best_val_acc, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "epoch_sums": self.epoch_sums, "epochs_run": self.epochs_run,
                "num_params": self.store.num_params}

    def save(self, name: str, best: bool = False, keep: bool = False) -> None:
        """Snapshot the state and write it as `name`.npz behind the next steps (saver.py); `best`: it is also
        best.npz (a second name of the file written, or, when that write fails, a write of its own); `keep`: also
        step-NNNNNNNN.npz (train.keep_checkpoints). The outcome is collected by the next save or collect_save()."""
        self.collect_save()
        meta = self._meta()
        lag = self.executor.settle() if self.executor is not None else 0
        if lag:  # the state is that many steps behind the counters: the checkpoint resumes from there
            meta["step"], meta["step_in_epoch"] = self.step - lag, max(self.step_in_epoch - lag, 0)
            self.log.warning(f"checkpoint {name}: the last {lag} step(s) could not be brought in (a host was lost "
                             f"before it sent its state); it resumes at step {meta['step']}")
        arrays = self.writer.snapshot(params=self.store.params, velocity=self.opt.velocity, buffers=self.store.buffers,
                                      ema_params=self.ema and self.ema.params)
        path, step = self.out / f"{name}.npz", meta["step"]

        def job():
            try:
                checkpoint.save(path, meta=meta, **arrays)
            except checkpoint.CheckpointWriteError:
                if best and name != "best":  # the best model must not be lost with the disk full for `name`
                    checkpoint.save(self.out / "best.npz", meta=meta, **arrays)
                raise
            if best and name != "best":
                atomic_link(path, self.out / "best.npz")
            if keep:
                self._keep_step_checkpoint(path, step)

        self.writer.start(job, (name, self._position() if name == "last" and not lag else None))

    def collect_save(self) -> None:
        """Wait for the checkpoint write in flight (the executor answers its peers meanwhile) and report it: a
        failure is logged and remembered (training goes on, fit() ends non-zero if the last one never was written)."""
        done = self.writer.collect(getattr(self.executor, "meanwhile", None))
        if done is None:
            return
        (name, position), error = done
        if error is not None:
            self.unsaved = error
            self.log.error(f"{error}; training goes on, the next checkpoint will try again")
            return
        if self.unsaved is not None:
            self.log.warning(f"{self.out / (name + '.npz')} written: checkpoints are saved again")
        self.unsaved = None
        if position is not None:  # a checkpoint behind the counters is not the state now
            self.saved_at = position

    def _position(self) -> tuple:
        """What a checkpoint of the state now would record beyond the arrays, which change only with steps."""
        return (self.step, self.epoch, self.step_in_epoch, self.best_epoch, self.bad_epochs, self.epochs_run)

    def _keep_step_checkpoint(self, last: Path, step: int) -> None:
        """train.keep_checkpoints > 0: `last`, just written, is also kept as step-NNNNNNNN.npz (a hard link: no
        second write), and the oldest beyond K are removed. In the writer's thread."""
        k = self.cfg.train.keep_checkpoints
        if k <= 0:
            return
        atomic_link(last, self.out / f"step-{step:08d}.npz")
        for old in sorted(self.out.glob("step-*.npz"))[:-k]:
            old.unlink(missing_ok=True)

    def restore(self, path: Path) -> None:
        arrays, meta = checkpoint.load(path)
        if meta["num_params"] != self.store.num_params or meta["class_names"] != self.ds.class_names:
            raise checkpoint.CheckpointError(f"{path}: model or classes differ from this run's config/dataset")
        self.store.params[...] = arrays["params"]
        self.store.buffers[...] = arrays["buffers"]
        self.opt.velocity[...] = arrays["velocity"]
        if self.ema is not None:  # a checkpoint from a run without the average: it starts from the weights
            self.ema.params[...] = arrays.get("ema_params", arrays["params"])
        for k in ("epoch", "step_in_epoch", "step", "best_val_acc", "best_epoch", "bad_epochs", "epochs_run"):
            setattr(self, k, meta[k])
        self.epoch_sums = list(meta["epoch_sums"])
        self.log.info(f"resumed from {path}: epoch {self.epoch} step {self.step} (best val acc {self.best_val_acc:.4f})")

    # ---- the loop --------------------------------------------------------------------------------------------------
    def write(self, record: dict) -> None:
        """One metrics line (and its TensorBoard scalars)."""
        if self.board is not None:
            self.board.record(record)
        self.metrics.append(record, self.epoch)

    def lr(self) -> float:
        """The scheduled learning rate of the current step."""
        t = self.cfg.train
        return lr_at(self.step, base_lr=t.lr, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                     min_lr=t.min_lr)

    def fit(self, executor: Executor, stop_at_step: int = 0) -> dict:
        """Train to the end (or early stop, or a stop request, or stop_at_step); write last.npz and summary.json
        and return the summary. ExecutorFailure propagates after last.npz is written."""
        t = self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        if self.step == 0 and self.metrics.jsonl.exists():
            # A fresh run in a used folder: its curves must not continue the old run's.
            self.log.warning(f"{self.out} holds an earlier run: starting it over (use --resume to continue it)")
            self.metrics.jsonl.unlink()
        self.check_space()
        self.metrics.write_csv()
        try:  # atomically: a full disk leaves the previous config.toml, never a truncated one --resume would read
            text = config_mod.dumps(self.cfg).encode()
            atomic_write(self.out / "config.toml", lambda f: f.write(text))
        except OSError as e:
            self.log.error(f"{self.out / 'config.toml'}: cannot write it ({e.strerror})")
        wall0 = time.perf_counter()
        sigs = [signal.SIGINT, signal.SIGTERM] + ([self.preempt_signal] if self.preempt_signal else [])
        old = {s: signal.signal(s, self._on_signal) for s in sigs}
        stopped_early = interrupted = False
        self.executor = executor
        self.board = Board(self.out, t.tensorboard, purge_step=self.step)
        try:
            while self.epoch < t.epochs and not stopped_early:
                batches = self.sampler.batches(self.epoch)
                bar = Progress(len(batches), self.step_in_epoch, f"epoch {self.epoch + 1}/{t.epochs}", t.progress)
                lr = 0.0
                while self.step_in_epoch < len(batches):
                    if self.stop_requested or (stop_at_step and self.step >= stop_at_step):
                        interrupted = True
                        break
                    indices = batches[self.step_in_epoch]
                    t0 = time.perf_counter()
                    lr = self.lr()
                    res = executor.train_step(indices, self.epoch, self.step, lr)
                    self.model.update_running_stats(res.bn_moments, self.cfg.model.bn_momentum)
                    if self.ema is not None and not getattr(executor, "averages", False):
                        self.ema.update(self.store.params)  # (workers updating in shared memory keep it themselves)
                    norm = res.grad_norm
                    dt = time.perf_counter() - t0
                    self.epoch_sums = [self.epoch_sums[0] + res.loss_sum, self.epoch_sums[1] + res.correct,
                                       self.epoch_sums[2] + res.count, self.epoch_sums[3] + dt]
                    self.write({"step": self.step, "epoch": self.epoch, "loss": res.loss_sum / res.count,
                                "acc": res.correct / res.count, "lr": lr, "grad_norm": norm, "images": res.count,
                                "step_s": dt, **({"slowest": res.slowest} if res.slowest else {}),
                                **({"cipher_cpu_s": res.cipher_cpu_s} if res.cipher_cpu_s is not None else {}),
                                **({"ranks": res.ranks} if res.ranks is not None else {})})
                    self.step += 1
                    self.step_in_epoch += 1
                    if t.checkpoint_every_steps and self.step % t.checkpoint_every_steps == 0:
                        self.save("last", keep=True)
                    bar.step(f"loss {res.loss_sum / res.count:.3f} acc {res.correct / res.count:.3f} "
                             f"lr {lr:.4f} {res.count / dt:.0f} img/s" + (f" slowest {res.slowest}" if res.slowest else ""))
                bar.close()
                if interrupted:
                    break
                stopped_early = self._end_epoch(executor, lr)
        except StepInterrupted as e:  # a training step or the validation pass; the state is whole either way
            self.log.error(f"step {self.step}: {e}; stopping")
            interrupted = True
        except ExecutorFailure:
            self.save("last")
            self.collect_save()
            self.log.error(f"checkpoint written to {self.out / 'last.npz'} (step {self.step}); resume with --resume")
            raise
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.board.close()
        self.collect_save()
        if self.saved_at != self._position():  # not already on disk (an epoch's end just wrote it)
            self.save("last")
            self.collect_save()
        self.executor = None
        summary = {**self._summary(time.perf_counter() - wall0, stopped_early, interrupted), **executor.summary()}
        try:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        except OSError as e:
            self.log.error(f"{self.out / 'summary.json'}: cannot write it ({e.strerror})")
        if self.unsaved is not None:  # the run's end is not on disk: say so with the exit code
            raise self.unsaved
        return summary

    def check_space(self) -> None:
        """Warn at the start when the run folder cannot hold two checkpoints (best and last)."""
        need = 2 * checkpoint.size_of(self.store.params, self.opt.velocity, self.store.buffers,
                                      ema_params=self.ema and self.ema.params)
        free = shutil.disk_usage(self.out).free
        if free < need:
            self.log.warning(f"{self.out}: {free:,} bytes free, two checkpoints need about {need:,}: checkpoints "
                             f"will fail until space is freed (training goes on and says so at each one)")

    def _end_epoch(self, executor, lr: float) -> bool:
        loss_sum, correct, count, secs = self.epoch_sums
        val_idx = self.ds.val_idx
        if len(val_idx):
            vloss, vcorrect = self.evaluate(executor, val_idx)
            val_loss, val_acc = vloss / len(val_idx), vcorrect / len(val_idx)
        else:  # no validation split: track training accuracy so best/early stopping still mean something
            val_loss, val_acc = None, correct / max(count, 1)  # null in metrics.jsonl (NaN is not JSON)
        record = {"epoch": self.epoch + 1, "step": self.step, "train_loss": loss_sum / max(count, 1),
                  "train_acc": correct / max(count, 1), "val_loss": val_loss, "val_acc": val_acc, "lr": lr,
                  "images_per_s": count / secs if secs else 0.0}
        self.write(record)
        self.board.split(executor.summary().get("breakdown", {}), self.step)
        self.board.flush()
        self.log.info(f"epoch {self.epoch + 1}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f}"
                      f" | val loss {val_loss if val_loss is None else round(val_loss, 4)} acc {val_acc:.4f} | {record['images_per_s']:.1f} img/s")
        self.epoch += 1
        self.epochs_run += 1
        self.step_in_epoch = 0
        self.epoch_sums = [0.0, 0, 0, 0.0]
        improved = val_acc > self.best_val_acc
        if improved:
            self.best_val_acc, self.best_epoch, self.bad_epochs = val_acc, self.epoch, 0
        else:
            self.bad_epochs += 1
        self.save("last", best=improved)  # best.npz: a second name of the same file (no second write)
        if self.cfg.train.patience and self.bad_epochs >= self.cfg.train.patience:
            self.log.info(f"early stop: no better val accuracy for {self.bad_epochs} epochs "
                          f"(best {self.best_val_acc:.4f} at epoch {self.best_epoch})")
            return True
        return False

    def evaluate(self, executor, indices: np.ndarray) -> tuple[float, int]:
        """(Σ loss, Σ correct) of the evaluated model: the live weights, or with train.ema_epochs their moving
        average, put in the store for the evaluation (the workers evaluate it as they would the weights) and the
        live weights put back whatever happens (a failure's checkpoint must hold them)."""
        if self.ema is None:
            return executor.evaluate(indices)
        np.copyto(self.ema.live, self.store.params)
        np.copyto(self.store.params, self.ema.params)
        try:
            return executor.evaluate(indices, weights_replaced=True)
        finally:
            np.copyto(self.store.params, self.ema.live)

    def _summary(self, wall_s: float, stopped_early: bool, interrupted: bool) -> dict:
        return {"best_val_acc": self.best_val_acc, "best_epoch": self.best_epoch, "epochs_run": self.epochs_run,
                "epoch": self.epoch, "steps": self.step, "wall_s": wall_s, "stopped_early": stopped_early,
                "interrupted": interrupted, "stop_requested": self.stop_requested, "preempted": self.preempted,
                "restarts": self.restarts,
                "num_params": self.store.num_params,
                **self.ds.counts}

    def _on_signal(self, signum, frame) -> None:
        if signum == self.preempt_signal:  # preemption: finish the step, checkpoint, exit EXIT_PREEMPTED
            self.preempted = True
        elif self.stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.log.warning(f"signal {signum}: finishing this step, saving the last checkpoint, then stopping "
                         f"(again to stop at once)")
        self.stop_requested = True
        if self.executor is not None:
            self.executor.request_stop(STOP_GRACE_S)


def prepare(cfg: Config, resume: bool | str | None, store_factory=None) -> Trainer:
    """Load the data, build the model and, with `resume`, restore the run folder's last checkpoint (resume "auto":
    only if there is one; otherwise a missing one is an error)."""
    ds = load_dataset(cfg.data, cfg.train.seed)
    if len(ds.class_names) < 2:  # a classifier of one class learns nothing and reports accuracy 1.0
        raise ValueError(f"{cfg.data.path}: a classifier needs at least two classes; found "
                         f"{len(ds.class_names)} ({', '.join(ds.class_names)}) with >= "
                         f"{cfg.data.min_images_per_class} images (expected {cfg.data.path}/ClassName/image.jpg, "
                         f"one folder per class)")
    trainer = Trainer(cfg, ds, store_factory)
    last = Path(cfg.train.out) / "last.npz"
    if resume:
        if last.exists():
            restore_newest(trainer, last, fall_back=resume == "auto")
            trainer.metrics.trim(trainer.epoch, trainer.step)
        elif resume == "auto":
            trainer.log.info(f"--resume auto: no {last} yet, starting fresh")
        else:
            raise FileNotFoundError(f"--resume: {last} does not exist (--resume auto starts fresh when there is "
                                    f"none)")
    return trainer


def restore_newest(trainer: Trainer, last: Path, fall_back: bool) -> Path:
    """Restore `last`; when it is unreadable and fall_back (--resume auto), the newest step-NNNNNNNN.npz beside it
    that restores (train.keep_checkpoints), said in one warning line. Raises the CheckpointError of `last` when none
    does."""
    try:
        trainer.restore(last)
        return last
    except checkpoint.CheckpointError as e:
        if not fall_back:
            raise
        first = e
    for older in sorted(last.parent.glob("step-*.npz"), reverse=True):  # zero-padded steps: newest first
        try:
            trainer.restore(older)
        except checkpoint.CheckpointError:
            continue
        trainer.log.warning(f"--resume auto: {first}; resuming from {older.name}, the newest readable checkpoint "
                            f"(step {trainer.step})")
        return older
    raise checkpoint.CheckpointError(f"{first}; no readable step-NNNNNNNN.npz beside it either") from None


def prepare_or_exit(cfg: Config, resume: bool, command: str, store_factory=None) -> Trainer:
    """prepare(), with a missing/undecodable dataset or an unusable --resume checkpoint reported in one line."""
    try:
        return prepare(cfg, resume, store_factory)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        raise SystemExit(f"dptrain {command}: {e}") from None


def run_local(cfg: Config, resume: bool = False, stop_at_step: int = 0, command: str | None = None,
              executor_factory=LocalExecutor) -> dict:
    """Train in this process. With `command` (a CLI's name) data/checkpoint problems exit with one line.
    `executor_factory(cfg, model, dataset, store, opt)`: e.g. replay.replay_executor (a distributed run's sums)."""
    trainer = prepare_or_exit(cfg, resume, command) if command else prepare(cfg, resume)
    if cfg.train.batch_invariant_block:  # the same bits for any worker count: a replay is this run too
        executor_factory = InvariantExecutor
    executor = executor_factory(cfg, trainer.model, trainer.ds, trainer.store, trainer.opt)
    try:
        return trainer.fit(executor, stop_at_step=stop_at_step)
    except checkpoint.CheckpointWriteError as e:
        if command is None:
            raise
        raise SystemExit(f"dptrain {command}: training finished but its last checkpoint is not on disk: {e}") \
            from None
    finally:
        executor.close()


def exit_code(summary: dict) -> int:
    """0 done (or stopped at --stop-at-step); EXIT_PREEMPTED (75) stopped by train.checkpoint_signal; 130 stopped
    by Ctrl-C / SIGTERM."""
    return EXIT_PREEMPTED if summary.get("preempted") else 130 if summary.get("stop_requested") else 0
