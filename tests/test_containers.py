"""`dptrain launch` where /dev/shm is small, as in a Docker container (64 MB unless --shm-size says otherwise).

Against the kernel: each case runs in its own mount namespace (`unshare -m`) with a 64 MB tmpfs mounted on /dev/shm,
which is what a container gets. Without a capacity check the segments (sparse until touched) are made and the first
write past 64 MB kills the process with SIGBUS (rc 135, "Bus error"). Here the launch must end with one line naming
the need, the free space and the fixes, leave no segment, and with dist.shm_dir run to the end with its segments as
files in that folder. Needs root for the mount namespace: skipped otherwise, a failure with DPTRAIN_REQUIRE_NETNS=1
(CI runs as root, as for the multi-host tests)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dptrain.data.shm import PREFIX, NoSpace, SharedArray, leftover_segments, remove_orphans

SHM_MB = 64


def _require_mount_namespace() -> None:
    why = None
    if os.geteuid() != 0:
        why = "needs root (a tmpfs mounted on /dev/shm in a mount namespace)"
    elif shutil.which("unshare") is None:
        why = "needs unshare(1) (util-linux)"
    else:
        probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True,
                               text=True, timeout=30)
        if probe.returncode != 0:
            why = f"unshare -m failed: {probe.stderr.strip()}"
    if why:
        if os.environ.get("DPTRAIN_REQUIRE_NETNS") == "1":
            pytest.fail(f"mount namespaces required (DPTRAIN_REQUIRE_NETNS=1) but unavailable: {why}")
        pytest.skip(why)


def _in_small_shm(script: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the shell `script` in a new mount namespace whose /dev/shm is a 64 MB tmpfs; after it, list what is left
    in that /dev/shm on a last line "LEFT: ..." (the tmpfs goes with the namespace, so this is the only look)."""
    body = (f"mount -t tmpfs -o size={SHM_MB}m tmpfs /dev/shm || exit 99\n{script}\nrc=$?\n"
            f"echo LEFT: $(ls /dev/shm)\nexit $rc\n")
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", body], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _left(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("LEFT:"))[len("LEFT:"):].strip()


@pytest.fixture(scope="module")
def faces64(tmp_path_factory):
    """4 synthetic people at 64x64, the issue's setting: the default model's segments for 2 workers (weights,
    momentum and gradients in shared memory) are ~250 MB, far over 64 MB."""
    from dptrain.data.synth import generate
    root = tmp_path_factory.mktemp("faces64")
    generate(root / "synth", num_classes=4, num_rich=4, image_size=64, max_images=16, min_rich=12, progress=False)
    return root / "synth"


def _launch(data, out, cache, extra: str = "") -> str:
    return (f"DPTRAIN_CACHE={cache} {sys.executable} -m dptrain launch --workers 2 --data {data} --image-size 64 "
            f"--epochs 1 --batch-size 8 --out {out} {extra}")


@pytest.mark.timeout(300)
def test_launch_in_a_64mb_shm_fails_in_one_line_naming_both_figures_and_the_fixes(faces64, tmp_path):
    _require_mount_namespace()
    r = _in_small_shm(_launch(faces64, tmp_path / "run", tmp_path / "cache"))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out  # not 135 / -7 (SIGBUS), not 99 (the mount)
    assert "Bus error" not in out and "Traceback" not in out and "leaked" not in out, out
    lines = [line for line in r.stderr.splitlines() if "shared memory:" in line]
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("dptrain: shared memory: the run's ") and "/dev/shm has 64.0 MB free" in line, line
    need_mb = float(line.split(" segments need ")[1].split(" MB")[0].replace(",", ""))
    assert need_mb > SHM_MB, line
    assert "docker run --shm-size=" in line and "--dist.shm_dir=DIR" in line and "DPTRAIN_SHM_DIR" in line, line
    assert _left(r.stdout) == "", r.stdout  # nothing was made, nothing leaked


@pytest.mark.timeout(300)
def test_launch_with_shm_dir_runs_to_the_end_with_its_segments_in_that_folder(faces64, tmp_path):
    """The folder setting: the segments are files there (a local disk here), the workers map them, the run ends
    normally, and neither the folder nor the small /dev/shm keeps anything afterwards."""
    _require_mount_namespace()
    segs = tmp_path / "segs"
    segs.mkdir()
    r = _in_small_shm(_launch(faces64, tmp_path / "run", tmp_path / "cache", f"--dist.shm_dir={segs}"))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert f"MB in {segs} (" in r.stderr and '"epochs_run": 1' in r.stdout, out
    assert "Bus error" not in out and "Traceback" not in out, out
    assert not list(segs.iterdir()) and _left(r.stdout) == "", (list(segs.iterdir()), r.stdout)


@pytest.mark.timeout(120)
def test_a_full_tmpfs_is_an_error_when_the_segment_is_made_not_a_sigbus_at_first_write(tmp_path):
    """The race the capacity check cannot see: another process fills /dev/shm between the check and the segment.
    The pages are reserved when the segment is made (posix_fallocate), so creating it fails there, with the
    one-line message and no segment left; a sparse segment (ftruncate only, what SharedMemory does) is made fine
    and the child writing it dies of SIGBUS, which shows the namespace really is that small."""
    _require_mount_namespace()
    small = tmp_path / "small"
    small.mkdir()
    code = tmp_path / "race.py"
    code.write_text(textwrap.dedent(f"""
        import os
        import numpy as np
        from dptrain.data.shm import NoSpace, SharedArray
        with open("/dev/shm/other", "wb") as f:  # another process's 56 MB
            os.posix_fallocate(f.fileno(), 0, 56 << 20)
        for where in ("", {str(small)!r}):
            try:
                SharedArray.create(shape=(16 << 20,), dtype=np.uint8, writable=True, where=where)
            except NoSpace as e:
                print("NOSPACE", str(e), flush=True)
            else:
                print("MADE", flush=True)
        from multiprocessing import shared_memory
        s = shared_memory.SharedMemory("dptrain_sparse", create=True, size=16 << 20)
        s.buf[:] = bytes(16 << 20)  # touches pages past the free 8 MB
        print("WROTE", flush=True)
    """))
    script = (f"mount -t tmpfs -o size=24m tmpfs {small} || exit 98\n"
              f"fallocate -l 16m {small}/other2 || exit 97\n"
              f"{sys.executable} {code}\nrc=$?\nrm -f /dev/shm/dptrain_sparse\necho LEFTDIR: $(ls {small})\n"
              f"(exit $rc)")
    r = _in_small_shm(script, env={"PYTHONPATH": os.getcwd()})
    nospace = [line for line in r.stdout.splitlines() if line.startswith("NOSPACE")]
    assert len(nospace) == 2, r.stdout + r.stderr
    assert "segment dptrain_" in nospace[0] and "needs 16.0 MB, /dev/shm has 8.0 MB free" in nospace[0], nospace[0]
    assert f"{small} has 8.0 MB free" in nospace[1], nospace[1]
    assert "MADE" not in r.stdout and "WROTE" not in r.stdout, r.stdout
    assert r.returncode in (135, -7, 128 + 7), r.returncode  # the sparse control died of SIGBUS
    assert _left(r.stdout) == "other", r.stdout
    leftdir = next(line for line in r.stdout.splitlines() if line.startswith("LEFTDIR:"))
    assert leftdir.split(":", 1)[1].strip() == "other2", r.stdout


def test_a_missing_shm_dir_is_one_line_before_anything_is_made(faces64, tmp_path):
    r = subprocess.run([sys.executable, "-m", "dptrain", "launch", "--workers", "2", "--data", str(faces64),
                        "--epochs", "1", "--out", str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "DPTRAIN_SHM_DIR": str(tmp_path / "nowhere"),
                                         "DPTRAIN_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == \
        f"dptrain: $DPTRAIN_SHM_DIR '{tmp_path / 'nowhere'}' is not a directory", r.stderr


def test_folder_segments_are_files_readers_map_and_the_creator_removes(tmp_path):
    images = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
    seg = SharedArray.create(images, PREFIX + "t_p1_images", where=str(tmp_path))
    path = tmp_path / seg.name
    assert path.is_file() and (path.stat().st_mode & 0o777) == 0o600
    assert path.stat().st_blocks * 512 >= images.nbytes  # reserved, not sparse
    reader = SharedArray.attach(seg.spec())
    assert np.array_equal(reader.array, images) and not reader.array.flags.writeable
    with pytest.raises(FileExistsError):  # made exclusively: never someone else's file or link
        SharedArray.create(images, seg.name, where=str(tmp_path))
    seg.close()
    seg.unlink()
    assert not path.exists() and np.array_equal(reader.array, images)  # a reader keeps its mapping
    reader.close()
    with pytest.raises(NoSpace):
        SharedArray.create(shape=(1 << 50,), dtype=np.uint8, where=str(tmp_path))
    assert not list(tmp_path.iterdir())


def test_orphans_in_the_folder_are_removed_when_their_creator_is_gone(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = f"{PREFIX}r1_p{os.getpid()}_images"
    orphan = f"{PREFIX}r2_p{dead.pid}_images"
    for name in (mine, orphan):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / f"{PREFIX}r3_p{dead.pid}_dir").mkdir()  # not a segment of ours: left alone
    removed = remove_orphans(str(tmp_path))
    assert orphan in removed and mine not in removed
    assert leftover_segments(where=str(tmp_path)) == sorted([mine, f"{PREFIX}r3_p{dead.pid}_dir"])
