"""launch/slurm.sbatch under a real Slurm (slurmctld + a slurmd per namespace host, munge; tests/slurm_util.py).

Jobs of 2 nodes x 2 slots, tiny model: a run to the end with the same final weights as the ssh launch of the same
layout; a default run folder left by another job with the same id (a new controller counts from 1 again) refused;
a USR1 before the launcher has handlers (held, then a checkpoint and a requeue) and an `scontrol requeue` in the
middle (one orderly stop), each start with its own run id and fresh keys, resumed to the end.
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from multihost_util import ROOT, launcher, make_data, params, step_records, train_args, wait_until
from netns import cluster
from slurm_util import SlurmCluster, require_slurm

SCRIPT = ROOT / "launch" / "slurm.sbatch"
STEPS = 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    require_slurm()
    return make_data(tmp_path_factory.mktemp("slurmdata"))


def job_args(data: Path, **extra) -> list[str]:
    """The tiny run's flags for `dptrain launch`, without an output folder: the script's RUN is the run folder."""
    return [a for a in train_args(data, Path("unused"), **extra) if not a.startswith("--train.out=")]


def job_env() -> dict:
    bin_dir = Path(sys.executable).parent  # the venv's console script `dptrain`, the same path on every node
    return {"SLOTS": "2", "DPTRAIN": str(bin_dir / "dptrain"), "PORT": "29511", "WAIT_S": "60"}


def output(work: Path, job: int) -> str:
    path = work / f"dptrain-{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.timeout(300)
def test_sbatch_runs_to_the_end_like_the_ssh_launch_and_refuses_another_jobs_folder(data, tmp_path):
    work = tmp_path / "work"
    stale = work / "runs" / "slurm-1"  # an old controller's job 1, in the folder a new job 1 would use by default
    stale.mkdir(parents=True)
    (stale / "slurm-run").write_text("0123456789ab\n")
    (stale / "last.npz").write_bytes(b"an older job's checkpoint")
    args = job_args(data, train__steps_per_epoch=STEPS, train__epochs=1)
    with cluster(2, slots=2) as c, SlurmCluster(c, tmp_path / "slurm") as s:
        first = s.sbatch(["--nodes=2", str(SCRIPT), *args], cwd=work, env=job_env())
        assert first == 1
        info = s.wait_state(first, ("FAILED", "COMPLETED"), 60)
        log = output(work, first)
        assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, log)
        assert f"{stale} holds another job's run (0123456789ab; job ids start again on a new controller)" in log
        assert (stale / "last.npz").read_bytes() == b"an older job's checkpoint"

        job = s.sbatch(["--nodes=2", str(SCRIPT), *args], cwd=work, env=job_env())
        info = s.wait_state(job, ("FAILED", "COMPLETED"), 150)
        log = output(work, job)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log, s.logs())
        run = work / "runs" / f"slurm-{job}"
        assert "dptrain launch exited 0" in log
        assert "host h1: 2 workers ready (ranks 0..1)" in log and "host h2: 2 workers ready (ranks 2..3)" in log
        run_id = (run / "slurm-run").read_text().strip()
        assert info["Comment"] == f"dptrain-run:{run_id}" and f"(run {run_id}-0)" in log
        assert len(step_records(run)) == STEPS

        ssh_run = tmp_path / "ssh"
        with launcher(["--hostfile", str(c.hostfile), "--ssh-config", str(c.ssh_config), "--bind",
                       c.coordinator_addr, *args, f"--train.out={ssh_run}"], tmp_path / "ssh.log") as la:
            assert la.wait(90) == 0, la.log()
        # the layout (2 hosts x 2 slots) fixes every sum: the same bits whoever started the agents
        assert np.array_equal(params(run), params(ssh_run))


@pytest.mark.timeout(420)
def test_early_usr1_and_scontrol_requeue_each_stop_once_and_resume_with_fresh_keys(data, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    epochs, per_epoch = 20, 5
    args = job_args(data, train__epochs=epochs)
    with cluster(2, slots=2) as c, SlurmCluster(c, tmp_path / "slurm") as s:
        job = s.sbatch(["--nodes=2", str(SCRIPT), *args], cwd=work, env=job_env())
        run = work / "runs" / f"slurm-{job}"
        # 1. USR1 (as --signal=B:USR1 sends it: to the batch shell only) before the launcher even exists
        assert wait_until(lambda: f"job {job} start 0:" in output(work, job), 60), s.logs()
        s.run(["scancel", "--batch", "--signal=USR1", str(job)])
        assert wait_until(lambda: f"job {job} start 1:" in output(work, job), 120), output(work, job) + s.logs()
        first = output(work, job)
        assert "dptrain launch exited 75" in first, first
        done = len(step_records(run))
        assert done >= 1
        # 2. scontrol requeue in the middle of the second start: SIGTERM to every process of the job
        assert wait_until(lambda: len(step_records(run)) >= done + 3, 120), output(work, job)
        s.run(["scontrol", "requeue", str(job)])
        assert wait_until(lambda: f"job {job} start 2:" in output(work, job), 120), output(work, job) + s.logs()
        info = s.wait_state(job, ("COMPLETED", "FAILED"), 180)
        log = output(work, job)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log)
    codes = re.findall(r"dptrain launch exited (\d+)", log)
    assert codes == ["75", "130", "0"], log
    assert "could not be brought in" not in log and "Traceback" not in log, log
    assert log.count("resumed from") == 2, log
    run_id = (run / "slurm-run").read_text().strip()
    for start in range(3):  # its own run id (and keys) each start
        assert f"(run {run_id}-{start})" in log
    steps = [r["step"] for r in step_records(run)]
    assert steps == list(range(epochs * per_epoch)), steps  # every step once: each stop checkpointed its last
    assert time.time() > 0


@pytest.mark.timeout(240)
def test_time_limit_signal_checkpoints_and_requeues(data, tmp_path):
    """The real --signal=B:USR1@S before a --time limit (slurmctld sends it from its periodic time-limit check, so
    up to ~30 s late): exit 75 with last.npz, the script's `scontrol requeue`, a second start that resumes."""
    work = tmp_path / "work"
    work.mkdir()
    args = job_args(data, train__epochs=100000)  # cannot finish before the signal
    with cluster(2, slots=2) as c, SlurmCluster(c, tmp_path / "slurm") as s:
        job = s.sbatch(["--nodes=2", "--time=1", "--signal=B:USR1@55", str(SCRIPT), *args], cwd=work, env=job_env())
        run = work / "runs" / f"slurm-{job}"
        assert wait_until(lambda: "resumed from" in output(work, job), 180), output(work, job) + s.logs()
        log = output(work, job)
        s.run(["scancel", str(job)])
    assert "dptrain launch exited 75" in log.split(f"job {job} start 1:")[0], log
    assert "signal 10: finishing this step" in log and "could not be brought in" not in log, log
    assert (run / "last.npz").exists()
