"""Fused trials: jobs of the same shapes (but the width) trained together as one stacked model.

A sweep's jobs are often small (an MLP of width 128) and numerous (widths x learning rates x gamma x trials). One
such job cannot keep a device busy: most of a step is Python and kernel-launch overhead. Jobs that share every
shape but the hidden width (model class, depth, batch size, data shapes) and differ only in numbers (trial seed,
LR, GAMMA, PARAMETERIZATION, momentum, thresholds ...) and in WIDTH are trained here as one model whose
parameters are stacked along a leading "member" axis (``stacked.StackedMLP``): one batched matmul per layer
serves every member, each padded with zeros to the group's largest width and masked (``plan`` keeps a group's
widths within 2x of each other, which bounds the arithmetic the padding costs).

Each member is prepared exactly as ``run_config`` prepares a job (``prepare_job``: seeds, its own data
generator and batch function, model, ``mup.parameterize``, GAMMA), so it sees the same batches and starts from
the same weights. From the prepared jobs the fused trainer takes the stacked weights, each layer's output
multiplier (muP and GAMMA, from the member's own width), and each parameter's learning rate, momentum, weight
decay and Adam constants as per-member tensors. Every member keeps its own ``LossTracker`` (EMA, thresholds,
status) and ``Evaluations`` (test loss, grabs, the record), the same objects ``train_loop`` uses; test losses
and grabs are computed on the member's own (unstacked, unpadded) model after its current weights are copied into
it. A member that is done, diverged or at its MAX_ITER leaves the stack at once (the stack is compacted, and
narrowed to the widest member left), so it stops changing and its NaNs never reach another member; its record is
then identical in keys to ``run_config``'s and equal in values up to float32 rounding (batched, padded and single
matmuls round differently).

A step costs a fixed number of tensor operations whatever the number of members; what it does per member is the
member's own batch function. The losses read back are fed to the members' trackers in batches: a running copy of
every member's EMA, kept as one array, says at each read-back which members may have reached their last
threshold or diverged, and only those are fed then (the others every 256 steps, when a member leaves, or when an
observer looks at their tracker), so a member stops at the very step it would alone.

What fuses (``plan``, where every rule about it is written): the built-in ``MLP`` with an elementwise
nonlinearity, SGD (momentum, weight decay) or Adam/AdamW without amsgrad, MSE or cross-entropy loss, no
``post_init_fn``. Anything else runs one job at a time, with one note in the log saying why. Grabs are called
with the member's own optimizer object, whose param groups (learning rates) are right but whose state (momentum
buffers, Adam moments) is not updated by fused training.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from modelscape.backend import live
from modelscape.backend.inputs import first_batch, nonfinite
from modelscape.backend.job import PreparedJob, finish_record, prepare_job, prepare_resolved, run_config_safe, \
    run_resolved_safe, train_prepared
from modelscape.backend.plan import (  # noqa: F401  (plan_units, fuse_key ...: re-exported, they lived here in 0.3)
    ELEMENTWISE, FUSABLE_MODELS, NUMERIC_KEYS, fuse_key, optimizer_kind, plan_units, stack_key, why_not_fusable,
    width_buckets)
from modelscape.backend.records import failed_record
from modelscape.backend.stacked import StackedMLP, StackedOptimizer, padded_numel
from modelscape.backend.trainloop import Evaluations, LossTracker, match_shapes, observers_wanting, read_losses

__all__ = ["run_group", "train_fused", "StackedMLP", "StackedOptimizer", "fuse_cap", "member_bytes"]

log = logging.getLogger(__name__)

CPU_FUSE_MAX = 64  # beyond this a CPU's caches, not launch overhead, set the pace
FEED_EVERY = 256  # steps of losses a member's tracker may lag behind, at most


def fuse_cap(fuse_max: int, device, member_bytes: int = 0) -> int:
    """How many jobs one group may hold: ``fuse_max``, at most ``CPU_FUSE_MAX`` on a CPU, and on CUDA at most
    half of the free device memory over ``member_bytes`` (one member's estimated footprint)."""
    cap = max(1, int(fuse_max))
    device = torch.device(device)
    if device.type != "cuda":
        return min(cap, CPU_FUSE_MAX)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(cap, int(free // 2 // max(int(member_bytes), 1))))


def member_bytes(job: PreparedJob, width: int | None = None) -> int:
    """Device memory one member of a fused group needs, roughly, padded to ``width`` (default: its own): its
    weights six times (stacked, gradient, two optimizer states, centering baseline, its own model) and three
    activations per layer and sample."""
    model = job.model
    width = int(model.width if width is None else width)
    n_params = padded_numel(model, width)
    return 4 * (6 * n_params + 3 * job.cfg["N_SAMPLES"] * width * (model.depth + 1))


# --------------------------------------------------------------------------------------------------------
# The fused trainer
# --------------------------------------------------------------------------------------------------------

class _Member:
    def __init__(self, job: PreparedJob):
        lk = job.loop_kwargs
        self.job = job
        self.tracker = LossTracker(lk["thresholds"], lk["relative"], lk["ema_smoother"],
                                   keep_raw=not lk["only_thresholds"], verbose=lk["verbose"])
        self.evals = Evaluations(job.net, job.loss_fn, lk["X_te"], lk["y_te"], curves=not lk["only_thresholds"],
                                 eval_every=lk["eval_every"], grabs=lk["grabs"], grab_model=lk["grab_model"],
                                 opt=job.opt, grab_kwargs=lk["grab_kwargs"])
        self.max_iter = int(lk["max_iter"])
        self.after_sync = observers_wanting(job.observers, "after_sync")
        self.at_end = observers_wanting(job.observers, "at_end")
        self.label = live.axes_label(job.axes)  # prefixes what this member's tracker and grabs print
        self.view = None  # what its after_sync observers get as its tracker (_LazyTracker)


def _per_member_loss(loss_fn, out: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """(G,) losses of stacked outputs and targets, each as ``loss_fn(match_shapes(out_g, y_g), y_g)``."""
    G = out.shape[0]
    if isinstance(loss_fn, nn.MSELoss):
        if out.shape != Y.shape and out.numel() == Y.numel() and Y.is_floating_point():
            out = out.reshape(Y.shape)
        return (out - Y).pow(2).reshape(G, -1).mean(1)
    return torch.func.vmap(lambda o, y: loss_fn(match_shapes(o, y), y))(out, Y)


class _StackCache:
    """Stacks the members' tensors, reusing the last stack when they hand back the same tensors (offline)."""

    def __init__(self):
        self.src, self.out = None, None

    def __call__(self, tensors: list) -> torch.Tensor:
        if self.src is None or len(self.src) != len(tensors) or any(a is not b for a, b in zip(self.src, tensors)):
            self.src, self.out = list(tensors), torch.stack(tensors)
        return self.out


class _Losses:
    """The train losses read back from the device and not yet fed to the members' trackers, one (steps, rows)
    block per read-back, and a running copy of each member's EMA (as ``LossTracker.feed`` computes it) that says
    which members may have to stop: an EMA below the member's lowest threshold (every threshold crossed: done) or
    a loss that is not finite (diverged). ``rows[r]`` is the member of row ``r``."""

    def __init__(self, members: list, rows: list):
        self.members, self.blocks, self.base, self._all, self.held = members, [], 0, None, 0
        self.primed = False  # every tracker fed once: relative thresholds are known
        self.select(rows)

    def select(self, rows: list) -> None:
        """The stack now holds ``rows``; every tracker must be fed up to date (``feed_all``) before."""
        assert not self.blocks
        self.rows = list(rows)
        trackers = [self.members[i].tracker for i in rows]
        self.smooth = np.array([t.smoother for t in trackers], dtype=np.float64)
        self.rest = np.array([1.0 - t.smoother for t in trackers], dtype=np.float64)
        self.ema = np.zeros(len(rows))
        self.limit = np.full(len(rows), np.inf)
        for r in range(len(rows)):
            self._copy(r)

    def _copy(self, r: int) -> None:
        t = self.members[self.rows[r]].tracker
        if t.ema is not None:
            self.ema[r] = t.ema
        if t.seen and len(t.thresholds):
            lowest = float(t.thresholds.min())
            # a hair above it: the copy computes what the tracker does, and errs on the side of feeding
            self.limit[r] = lowest + 1e-6 * abs(lowest)

    def add(self, block: np.ndarray) -> np.ndarray:
        """Keep ``block`` (the losses of the steps since the last read-back, one column per row); returns which
        rows may have to stop."""
        self.blocks.append(block)
        self.held += len(block)  # steps of losses held back
        self._all = None
        if not self.primed:
            return np.ones(len(self.rows), dtype=bool)
        flag = np.zeros(len(self.rows), dtype=bool)
        ema = self.ema
        for v in block:
            flag |= ~np.isfinite(v)
            ema = self.smooth * ema + self.rest * v
            flag |= ema < self.limit
        self.ema = ema
        return flag

    def feed(self, r: int) -> None:
        """Feed row ``r``'s tracker every loss it has not seen."""
        m = self.members[self.rows[r]]
        if not self.blocks:
            return
        if self._all is None:
            self._all = self.blocks[0] if len(self.blocks) == 1 else np.concatenate(self.blocks)
        new = self._all[m.tracker.seen - self.base:, r]
        if len(new):
            live.set_label(m.label)
            m.tracker.feed(np.ascontiguousarray(new))
            self._copy(r)

    def feed_all(self) -> None:
        for r in range(len(self.rows)):
            self.feed(r)
        self.base += self.held
        self.blocks, self._all, self.primed, self.held = [], None, True, 0


class _LazyTracker:
    """A member's ``LossTracker`` as its ``after_sync`` observers see it: fed every loss read back so far the
    moment they look at it. Most look only now and then (live progress, once per LIVE_EVERY seconds)."""

    def __init__(self, losses: _Losses, member: int, looked: set):
        self._losses, self._member, self._looked = losses, member, looked

    def __getattr__(self, name):
        losses = self._losses
        r = losses.rows.index(self._member)
        losses.feed(r)
        self._looked.add(r)
        return getattr(losses.members[self._member].tracker, name)


def train_fused(jobs: list) -> list:
    """Train prepared jobs (all passing ``why_not_fusable``, with equal ``stack_key``) as one stacked model.

    Returns one record per job, in order, as ``train_prepared`` would give for each: a member that raises
    (a grab, say) gets a ``failed`` record and leaves the group; the others go on.
    """
    t0 = time.perf_counter()
    members = [_Member(j) for j in jobs]
    records: list = [None] * len(jobs)
    stack = StackedMLP([j.model for j in jobs])
    opt = StackedOptimizer(jobs, stack)
    first = jobs[0]
    loss_fn, sync = first.loss_fn, max(1, int(first.loop_kwargs["sync_every"]))
    evals = members[0].evals  # when a step is evaluated is the same for every member (stack_key)
    baseline = [p.detach().clone() for p in stack.params] if first.cfg["CENTER"] else None
    stack_X, stack_Y = _StackCache(), _StackCache()
    f0 = None  # (stacked inputs, baseline output on them): offline, the inputs are the same stack every step
    active = list(range(len(jobs)))  # member index of each row of the stack
    losses = _Losses(members, active)
    looked: set = set()  # rows whose tracker an observer looked at (and so fed) at this read-back
    for i, m in enumerate(members):
        if m.after_sync:
            m.view = _LazyTracker(losses, i, looked)
    max_iter = np.array([m.max_iter for m in members])  # per row of the stack, as `verbose`
    verbose = np.array([m.tracker.verbose for m in members], dtype=bool)
    next_stop = max_iter.min()  # the first MAX_ITER among the members in the stack
    watched = [(r, i) for r, i in enumerate(active) if members[i].after_sync]  # rows with after_sync observers
    batch_fns = [m.job.batch_fn for m in members]
    failed = False  # some member has a record (failed) and must leave at the next read-back
    pending: list[torch.Tensor] = []
    step = 0

    def fail(i, exc):
        nonlocal failed
        job = jobs[i]
        records[i] = failed_record(job.axes, exc, job.device, time.perf_counter() - job.t0)
        failed = True

    while active:
        if step:
            batches = [fn(step) for fn in batch_fns]
        else:  # checked as train_loop checks it: a bad batch fails the group, and each job then trains alone
            batches = []
            for i in active:
                job = members[i].job
                job.batch_fn, X0, y0 = first_batch(job.batch_fn, job.model)
                batches.append((X0, y0))
            batch_fns = [members[i].job.batch_fn for i in active]
        due = evals.due(step)
        if due or step == 0:  # as train_loop: record, or at step 0 check the grabs
            rows = [r for r, i in enumerate(active) if records[i] is None]
            for r in rows if due else ():
                stack.write_back(r, members[active[r]].job.model)
            for r in rows:
                m = members[active[r]]
                live.set_label(m.label)
                try:
                    m.evals.record(step, *batches[r]) if due else m.evals.check(*batches[r])
                except Exception as e:
                    fail(active[r], e)
        X = stack_X([b[0] for b in batches])
        Y = stack_Y([b[1] for b in batches])
        out = stack.forward(stack.params, X)
        if baseline is not None:
            if f0 is None or f0[0] is not X:
                with torch.no_grad():
                    f0 = (X, stack.forward(baseline, X))
            out = out - f0[1]
        step_losses = _per_member_loss(loss_fn, out, Y)
        grads = torch.autograd.grad(step_losses.sum(), stack.params)
        opt.step(stack.params, grads)
        pending.append(step_losses.detach())
        step += 1
        # Every member's losses are read every `sync` steps and at its MAX_ITER, as train_loop does.
        if step % sync and step < next_stop:
            continue
        at_max = step >= max_iter
        flag = losses.add(read_losses(pending).reshape(len(pending), -1))  # (steps, rows)
        pending.clear()
        fed = flag | at_max | verbose  # verbose trackers print each step's loss: fed at each read-back
        if not losses.primed or losses.held >= FEED_EVERY:
            losses.feed_all()
            fed[:] = True
        else:
            for r in np.flatnonzero(fed):
                losses.feed(r)
        looked.clear()
        for r, i in watched:
            m = members[i]
            if records[i] is None:
                live.set_label(m.label)
                try:
                    for fn in m.after_sync:
                        fn(step, m.view, m.evals)
                except Exception as e:
                    fail(i, e)
        fed[list(looked)] = True
        leaving = [r for r in np.flatnonzero(fed) if at_max[r] or members[active[r]].tracker.status != "not_reached"]
        if failed:
            leaving = sorted(set(leaving) | {r for r, i in enumerate(active) if records[i] is not None})
            failed = False
        if not leaving:
            continue
        losses.feed_all()  # every tracker up to date: the stack's rows are about to change
        leaving = [r for r, i in enumerate(active) if r in leaving or members[i].tracker.status != "not_reached"]
        for r in leaving:
            i = active[r]
            if records[i] is not None:
                continue
            m = members[i]
            if m.tracker.status == "diverged":  # NaN that came with the data is the data's fault: say so
                note = nonfinite(*batches[r], m.job.batch_fn, step - 1)
                if note:
                    log.warning("fused trials: job %s diverged with its data: %s", m.label, note)
            stack.write_back(r, m.job.model)
            try:
                out_i = m.evals.result(m.tracker, step, *batches[r])
                for fn in m.at_end:
                    fn(out_i, m.job.model, m.job.opt)
                # wall time: this member's share of the group's time so far
                records[i] = finish_record(m.job, out_i, (time.perf_counter() - t0) / len(jobs))
            except Exception as e:
                fail(i, e)
        failed = False
        keep = [r for r in range(len(active)) if r not in leaving]
        active = [active[r] for r in keep]
        if active:
            width = stack.select(keep)
            opt.select(keep, stack, width)
            if baseline is not None:
                baseline = stack.take(keep, baseline, width)
                f0 = None
            losses.select(active)
            max_iter, verbose = max_iter[keep], verbose[keep]
            next_stop = max_iter.min()
            watched = [(r, i) for r, i in enumerate(active) if members[i].after_sync]
            batch_fns = [members[i].job.batch_fn for i in active]
    return records


# --------------------------------------------------------------------------------------------------------
# A group of jobs, as the sweep engine runs it
# --------------------------------------------------------------------------------------------------------

def run_group(jobs: list, bfn_config: dict, device="cpu", *, resolved: bool = False) -> list:
    """Run ``jobs`` (a list of ``(config, axes)``) fused where possible; one record per job, in order.

    Every job is prepared as ``run_config`` prepares it (``resolved``: the configs are resolved already, as the
    sweep engine ships them, and are prepared as ``run_resolved`` prepares them). One that cannot be fused
    (``why_not_fusable``; one note in the log per reason) is trained at once, alone, as ``run_config`` would; the
    others are trained as one stacked model per shape and width bucket (``plan.width_buckets``) by
    ``train_fused``, members of a bucket in order of width. Never raises: a job that fails gets a
    ``failed`` record, as with ``run_config_safe``.
    """
    records: list = [None] * len(jobs)
    prepared, reasons, groups = {}, {}, {}
    for k, (config, axes) in enumerate(jobs):
        t = time.perf_counter()
        try:
            job = prepare_resolved(config, bfn_config, device, axes) if resolved else \
                prepare_job(config, bfn_config, device, axes, quiet=True)
        except Exception as e:
            records[k] = failed_record(axes, e, device, time.perf_counter() - t)
            continue
        reason = why_not_fusable(job)
        if reason is not None:
            # trained before the next job is prepared: its model may draw on the global RNG prepare_job seeded
            reasons[reason] = reasons.get(reason, 0) + 1
            records[k] = _train_alone(job)
            continue
        prepared[k] = job
        groups.setdefault(stack_key(job), []).append(k)
    for reason, n in reasons.items():
        log.warning("fused trials: %d job(s) run one by one: %s", n, reason)
    for same in groups.values():
        # by width bucket (widths within 2x share a stack, padded), then in pieces the device has room for
        widths = [prepared[k].model.width for k in same]
        for bucket in width_buckets(widths):
            bucket = [same[b] for b in bucket]
            widest = prepared[bucket[-1]]  # every member of a piece is padded to the piece's widest
            cap = fuse_cap(widest.cfg["FUSE_MAX"], device, member_bytes(widest))
            for ks in (bucket[c:c + cap] for c in range(0, len(bucket), cap)):
                _train_piece(ks, jobs, prepared, records, bfn_config, device, resolved)
    return records


def _train_piece(ks, jobs, prepared, records, bfn_config, device, resolved) -> None:
    """Train the prepared jobs ``ks`` (indices into ``jobs``) as one group; their records go to ``records``."""
    if len(ks) == 1:  # a fusable model draws nothing from the global RNG: training it later is the same
        records[ks[0]] = _train_alone(prepared[ks[0]])
        return
    try:
        for k, rec in zip(ks, train_fused([prepared[k] for k in ks])):
            records[k] = rec
    except Exception as e:  # a bug or a shape mismatch the checks missed: the jobs still run, one by one
        log.warning("fused trials: a group of %d jobs failed to train fused (%s: %s); running them one by "
                    "one", len(ks), type(e).__name__, e)
        for k in ks:  # prepared again: the data generators have moved on
            config, axes = jobs[k]
            records[k] = run_resolved_safe(config, bfn_config, device, axes) if resolved else \
                run_config_safe(config, bfn_config, device, axes)


def _train_alone(job: PreparedJob) -> dict:
    """``train_prepared`` that never raises, as ``run_config_safe``."""
    live.set_label(live.axes_label(job.axes))
    try:
        return train_prepared(job)
    except Exception as e:
        return failed_record(job.axes, e, job.device, time.perf_counter() - job.t0)
