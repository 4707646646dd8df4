"""Faults injected into worker processes by the tests, never by the production worker.

A test that wants a worker to die, hang or balloon at a known step sets DPTRAIN_FAULT=PHASE:STEP:RANK[,...] and puts
this folder first on PYTHONPATH (distutil.fault_env / inject_faults); every Python process started under that
environment imports this module at start-up (Python's `sitecustomize` hook) and, when it imports
dptrain.distributed.worker, gets that module's Worker patched:
  exit     the rank exits (status 19) as that step's first attempt begins
  update   the rank dies (status 17) inside its update of that step, half of its slice written
  hang     the rank never answers that step, while its heartbeat goes on (a stuck rank)
  balloon  the rank touches 256 MB more at that step (an OOM kill inside a memory-limited cgroup)
and, when a host agent imports dptrain.distributed.mesh (RANK = its host index), its replica drifts after its
update of that step (a host whose copy silently went wrong, which SYNC's checksums must catch):
  wdrift   one weight of the replica, outside the host's own slice, changes by 1e-3
  vdrift   the momentum of the replicated factored Linear (dist.factor_update) changes by 1e-3 on this host
A replacement of the rank inherits the environment: a later step's fault hits it. DPTRAIN_SLOW_SAVE_S=S makes every
checkpoint save (dptrain.checkpoint.save) wait S seconds first: a disk that slow. Nothing happens in a process that
never imports those modules, or when neither variable is set.
"""
import importlib.abc
import importlib.util
import os
import sys
import time


def parse(spec: str) -> set[tuple]:
    out = set()
    for item in filter(None, spec.split(",")):
        phase, step, rank = item.split(":")
        out.add((phase, int(step), int(rank)))
    return out


def slow_saves(module, seconds: float) -> None:
    save = module.save

    def slow_save(*args, **kwargs):
        time.sleep(seconds)
        return save(*args, **kwargs)
    module.save = slow_save


def patch_worker(module, faults: set[tuple]) -> None:
    Worker = module.Worker
    original_run_step, original_update_slice = Worker.run_step, Worker.update_slice

    def run_step(self, msg):  # named as the method it wraps: a stuck rank's stack shows "in run_step"
        if ("exit", msg.step, self.rank) in faults and msg.fields["attempt"] == 0:
            os._exit(19)
        if ("hang", msg.step, self.rank) in faults:
            while True:
                time.sleep(1)
        if ("balloon", msg.step, self.rank) in faults:
            import numpy as np
            self.balloon = np.ones(32_000_000)
        return original_run_step(self, msg)

    def update_slice(self, msg):
        if ("update", msg.step, self.rank) not in faults:
            return original_update_slice(self, msg)
        f = msg.fields
        src, dst = f["src"], 1 - f["src"]
        hi = f["lo"] + (f["hi"] - f["lo"]) // 2  # half of the slice written, then the process is gone
        self.opt.step(self.params2[src], self.gsum, f["lr"], f["scale"], f["lo"], hi, params_out=self.params2[dst],
                      velocity_in=self.velocity2[src], velocity_out=self.velocity2[dst])
        os._exit(17)

    Worker.run_step, Worker.update_slice = run_step, update_slice


def patch_mesh(module, faults: set[tuple]) -> None:
    Replica = module.MeshReplica
    original = Replica.update_gather

    def update_gather(self, lr, scale, step, attempt, upstream, defer=False):
        # the whole all-gather first (dist.gather_overlap would let a later piece overwrite the drift)
        original(self, lr, scale, step, attempt, upstream)
        me = self.mesh.index
        if ("wdrift", step, me) in faults:
            other = next(h for h in self.mesh.hosts if h[0] != me)
            self.params[other[3]] += 1e-3  # the first weight of another host's slice: the whole copy's CRC moves
        if ("vdrift", step, me) in faults and self.replicate:
            self.opt.velocity[self.w[0]:self.w[1]] += 1e-3
    Replica.update_gather = update_gather


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the named modules as usual, and patches each right after it has been executed."""

    def __init__(self, patches: dict):
        self.patches = patches

    def find_spec(self, name, path=None, target=None):
        if name not in self.patches:
            return None
        patch = self.patches.pop(name)
        if not self.patches:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            patch(module)
        spec.loader.exec_module = exec_module
        return spec


_patches = {}
_faults = parse(os.environ.get("DPTRAIN_FAULT", ""))
if _faults:
    _patches["dptrain.distributed.worker"] = lambda m: patch_worker(m, _faults)
    _patches["dptrain.distributed.mesh"] = lambda m: patch_mesh(m, _faults)
_slow = float(os.environ.get("DPTRAIN_SLOW_SAVE_S", "0") or 0)
if _slow:
    _patches["dptrain.checkpoint"] = lambda m: slow_saves(m, _slow)
if _patches:
    sys.meta_path.insert(0, _PatchOnImport(_patches))
