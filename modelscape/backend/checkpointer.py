"""The job's side of checkpoints (CHECKPOINTS): the ``LoopObserver``s that write a job's weights while it trains.

What the files are, where they go and how they are read back is ``checkpoints``; this module only decides when
to save (chosen steps, threshold crossings, the end) and hands the tensors to ``checkpoints.write_tensors``.
"""
from __future__ import annotations

import copy
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import cloudpickle
import numpy as np
import torch

from modelscape.backend.checkpoints import (DIRNAME, FORMAT, SKELETON, atomic_write, flatten_model, flatten_tree,
                                            job_dir, needs_store_error, plan, write_tensors)
from modelscape.backend.trainloop import LoopObserver
from modelscape.utils import USER_MODULE_PREFIX

__all__ = ["job_observers", "FinalCheckpoint", "Checkpointer", "skeleton_bytes"]


def job_observers(job) -> list:
    """The checkpoint observer of a prepared job (``job.PreparedJob``), or none when CHECKPOINTS is empty."""
    steps, thresholds, final = plan(job.cfg)
    if not (steps or thresholds or final):
        return []
    if not job.cfg.get("JOB_ID"):
        raise needs_store_error("this job has no store id (JOB_ID is empty: run_config outside a sweep, or a "
                                 "sweep without a store)")
    cls = Checkpointer if steps or thresholds else FinalCheckpoint
    return [cls(job, steps, thresholds, final)]



class FinalCheckpoint(LoopObserver):
    """Saves the trained model at the end of the job (``final``) and puts the job's ``checkpoints`` list in
    its record. Needs nothing between steps, so a job with it still trains fused; with CHECKPOINT_OPTIMIZER it
    does not (``fusable``): the fused trainer keeps the optimizer's state in its own stacked optimizer."""

    def __init__(self, job, steps, thresholds: bool, final: bool):
        cfg = job.cfg
        self.dir = job_dir(cfg)
        self.rel = Path(DIRNAME) / cfg["JOB_ID"]  # entries name files relative to the experiment directory
        self.steps, self.final = set(steps), final
        self.with_opt = bool(cfg["CHECKPOINT_OPTIMIZER"])
        self.fusable = not self.with_opt
        self.thresholds = list(cfg["LOSS_CHECKPOINTS"])
        self.entries: list[dict] = []
        self.files: dict[int, dict] = {}  # step -> its files and their size, once written
        self.skeleton = skeleton_bytes(job.net, job.model, job.opt)  # taken now, at init: the baseline is f0

    def _save(self, step: int, label: str, state: dict, opt_state: dict | None, threshold=None) -> None:
        if not self.files:
            self._start()
        if step not in self.files:
            name = f"step-{step}"
            meta = {"step": step}
            size = write_tensors(self.dir / f"{name}.safetensors", *flatten_model(state), meta)
            opt_file = None
            if opt_state is not None:
                opt_file = str(self.rel / f"{name}.opt.safetensors")
                size += write_tensors(self.dir / f"{name}.opt.safetensors", *flatten_tree(opt_state), meta)
            self.files[step] = dict(file=str(self.rel / f"{name}.safetensors"), optimizer=opt_file, bytes=size)
        entry = dict(step=step, label=label, **self.files[step])
        if threshold is not None:
            entry["threshold"] = threshold
        self.entries.append(entry)

    def _start(self) -> None:
        """A job trained again (its checkpoints were missing, or it failed) starts from an empty directory, so
        the files there are always those its record lists."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / SKELETON, self.skeleton)

    def _save_now(self, step, label, model, opt, threshold=None):
        self._save(step, label, model.state_dict(), opt.state_dict() if self.with_opt else None, threshold)

    def at_end(self, record: dict, model, opt) -> None:
        steps = int(record["steps"])
        if steps in self.steps and steps not in self.files:  # the job stopped right at a requested step
            self._save_now(steps, f"step {steps}", model, opt)
        if self.final:
            self._save_now(steps, "final", model, opt)
        record["checkpoints"] = self.entries


class Checkpointer(FinalCheckpoint):
    """Also saves at chosen steps (``before_step`` sees the model after that many updates) and at each
    threshold crossing.

    A crossing at step ``t`` (the EMA of the loss of the model after ``t`` updates) is known only when the
    losses are read back, up to SYNC_EVERY steps later; until then the state before each step is kept (a ring
    of copies on the model's device, emptied at each read-back), and the one of step ``t`` is saved."""

    def __init__(self, job, steps, thresholds: bool, final: bool):
        super().__init__(job, steps, thresholds, final)
        self.ring: dict | None = {} if thresholds else None
        self.saved = np.zeros(len(self.thresholds), dtype=bool)

    def before_step(self, step: int, model, opt) -> None:
        if step in self.steps:
            self._save_now(step, f"step {step}", model, opt)
        if self.ring is not None and not self.saved.all():
            self.ring[step] = (_clone(model.state_dict()), _clone(opt.state_dict()) if self.with_opt else None)

    def after_sync(self, step: int, tracker, evals) -> None:
        if self.ring is None:
            return
        crossed = tracker.crossed
        for j in np.flatnonzero(~np.isnan(crossed) & ~self.saved):
            t = int(crossed[j])
            state, opt_state = self.ring[t]
            self._save(t, f"threshold {self.thresholds[j]:g}", state, opt_state, threshold=self.thresholds[j])
            self.saved[j] = True
        self.ring.clear()


def _clone(tree):
    """A copy of a state dict whose tensors are copies (on their device)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone(v) for v in tree)
    return tree


def skeleton_bytes(net, model, opt) -> bytes:
    """``net`` (the function trained: ``model``, or ``Centered(model)``) and ``opt`` pickled without ``model``'s
    saved tensors (emptied; a checkpoint fills them) and without cached data, on the CPU. The centering
    baseline keeps its weights: they are the model at init, which no checkpoint file holds otherwise."""
    memo = {}
    for t in model.state_dict(keep_vars=True).values():
        empty = torch.empty(0, dtype=t.dtype)
        memo[id(t)] = torch.nn.Parameter(empty, requires_grad=t.requires_grad) \
            if isinstance(t, torch.nn.Parameter) else empty
    if isinstance(getattr(net, "_cache", None), list):  # Centered's f0 on the data: tensors of data
        memo[id(net._cache)] = []
    memo[id(opt.state)] = defaultdict(dict)
    # A class loaded from MODEL_FILE lives in a module no other process can import by name: pickle it whole.
    from_files = {sys.modules[type(m).__module__] for m in net.modules()
                  if type(m).__module__.startswith(USER_MODULE_PREFIX)}
    for mod in from_files:
        cloudpickle.register_pickle_by_value(mod)
    try:
        net_copy, opt_copy = copy.deepcopy((net, opt), memo)
        net_copy.to("cpu")
        return cloudpickle.dumps({"format": FORMAT, "net": net_copy, "opt": opt_copy, "centered": net is not model})
    except Exception as e:
        raise RuntimeError(f"CHECKPOINTS: the built model ({type(model).__qualname__}) or its optimizer cannot be "
                           f"copied and pickled, so its checkpoints could not be loaded back: {type(e).__name__}: "
                           f"{e}") from e
    finally:
        for mod in from_files:
            cloudpickle.unregister_pickle_by_value(mod)

