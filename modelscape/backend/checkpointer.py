"""The job's side of checkpoints (CHECKPOINTS): the ``LoopObserver``s that write a job's weights while it trains.

What the files are, where they go and how they are read back is ``checkpoints``; this module decides when to save
(chosen steps, threshold crossings, the end), hands the tensors to ``checkpoints.write_tensors``, and describes
the built model as data (``describe_model``: ``model.json``), so that loading it back runs no pickle.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from modelscape.backend.checkpoints import (FORMAT, SKELETON, SKELETON_TENSORS, atomic_write, dirname, encode_value,
                                            flatten_model, flatten_tree, job_dir, needs_store_error, path_of, plan,
                                            write_tensors)
from modelscape.backend.trainloop import LoopObserver
from modelscape.mup.apply import scale_output
from modelscape.utils import qualname

__all__ = ["job_observers", "FinalCheckpoint", "Checkpointer", "describe_model"]


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

    optional = True  # a checkpoint that cannot be written (a full disk) costs the checkpoint, never the result

    def __init__(self, job, steps, thresholds: bool, final: bool):
        cfg = job.cfg
        self.dir = job_dir(cfg)
        self.role = f"checkpoints (writing {self.dir})"
        # entries name files relative to the experiment directory, in the folder of this job's store file
        self.rel = Path(dirname(cfg.get("STORE_FILE"))) / cfg["JOB_ID"]
        self.steps, self.final = set(steps), final
        self.with_opt = bool(cfg["CHECKPOINT_OPTIMIZER"])
        self.fusable = not self.with_opt
        self.thresholds = list(cfg["LOSS_CHECKPOINTS"])
        self.entries: list[dict] = []
        self.files: dict[int, dict] = {}  # step -> its files and their size, once written
        self.skeleton = describe_model(job)  # taken now, at init: the baseline is f0

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
        description, tensors = self.skeleton
        atomic_write(self.dir / SKELETON_TENSORS, tensors)
        atomic_write(self.dir / SKELETON, description)

    def _save_now(self, step, label, model, opt, threshold=None):
        self._save(step, label, model.state_dict(), opt.state_dict() if self.with_opt else None, threshold)

    def at_end(self, record: dict, model, opt) -> None:
        # listed first, the same list: should a save below fail, the record still lists the files written, and a
        # resumed sweep trains the job again for the missing one (``checkpoints.satisfied``)
        record["checkpoints"] = self.entries
        steps = int(record["steps"])
        if steps in self.steps and steps not in self.files:  # the job stopped right at a requested step
            self._save_now(steps, f"step {steps}", model, opt)
        if self.final:
            self._save_now(steps, "final", model, opt)


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

    def failed(self, exc) -> None:
        self.ring = None  # the copies of the model kept for threshold crossings: let them go

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


def describe_model(job) -> tuple[bytes, bytes]:
    """``(model.json, model.safetensors)`` of a prepared job: how to build its model and optimizer again from
    data alone (``checkpoints.load``). The class and its constructor's arguments (``job.model_spec``; a tensor
    among them goes to the second file), each module's muP multipliers and GAMMA (its ``_mup_*``, ``attn_mult``
    and ``attn_scale`` attributes, and whether it carries the scaling hook), whether the model is centered (the
    baseline's weights, the model at init, go to the second file), and the optimizer's class, settings and
    parameter groups by parameter name. A value that is not data (an object of your own as a constructor
    argument) is a TypeError now, before the job trains."""
    model, net, opt = job.model, job.net, job.opt
    cls, kwargs = job.model_spec or (type(model), None)
    if kwargs is None or type(model) is not cls:
        raise TypeError(f"CHECKPOINTS: the model trained is a {qualname(type(model))}, not the {qualname(cls)} built "
                        "from the config (a post_init_fn returned another model?); a checkpoint could not build it "
                        "again. Return the model post_init_fn receives, changed in place")
    tensors = {}
    args = encode_value(dict(kwargs), tensors, f"CHECKPOINTS: {qualname(cls)}'s constructor argument")
    modules = {}
    for path, mod in model.named_modules():
        # attn_scale: the parameterization's logit scale (1/d_head under muP), which the constructor does not set
        attrs = {k: v for k, v in vars(mod).items() if (k.startswith("_mup_") or k in ("attn_mult", "attn_scale"))
                 and isinstance(v, (bool, int, float, str))}
        if scale_output in mod._forward_hooks.values():
            attrs["hook"] = True
        if attrs:
            modules[path] = attrs
    centered = net is not model
    if centered:
        tensors.update({f"baseline.{k}": t.detach().to("cpu").clone() for k, t in net.baseline.state_dict().items()})
    names = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    groups = []
    for group in opt.param_groups:
        if any(id(p) not in names for p in group["params"]):
            raise TypeError("CHECKPOINTS: the optimizer holds tensors that are not parameters of the model; a "
                            "checkpoint could not build it again")
        settings = {k: v for k, v in group.items() if k != "params"}
        groups.append({"params": [names[id(p)] for p in group["params"]],
                       "settings": encode_value(settings, tensors, "CHECKPOINTS: an optimizer setting")})
    description = {
        "format": FORMAT,
        "model": {"class": path_of(cls), "kwargs": args, "modules": modules, "file": job.cfg.get("MODEL_FILE")},
        "centered": centered,
        "optimizer": {"class": path_of(type(opt)), "groups": groups,
                      "defaults": encode_value(dict(opt.defaults), tensors, "CHECKPOINTS: an optimizer default")},
    }
    return json.dumps(description, allow_nan=True).encode(), safetensors_bytes(tensors)
