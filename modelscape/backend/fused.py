"""Fused trials: jobs of the same shapes trained together as one stacked model.

A sweep's jobs are often small (an MLP of width 128) and numerous (learning rates x gamma x trials). One such
job cannot keep a device busy: most of a step is Python and kernel-launch overhead. Jobs that share every
shape (model class, width, depth, batch size, data shapes) and differ only in numbers (trial seed, LR, GAMMA,
PARAMETERIZATION, momentum, thresholds ...) are trained here as one model whose parameters are stacked along a
leading "member" axis: one batched matmul per layer serves every member.

Each member is prepared exactly as ``run_config`` prepares a job (``prepare_job``: seeds, its own data
generator and batch function, model, ``mup.parameterize``, GAMMA), so it sees the same batches and starts from
the same weights. From the prepared jobs the fused trainer takes the stacked weights, each layer's output
multiplier (muP and GAMMA), and each parameter's learning rate, momentum, weight decay and Adam constants as
per-member tensors. Every member keeps its own ``LossTracker`` (EMA, thresholds, status) and ``Evaluations``
(test loss, grabs, the record), the same objects ``train_loop`` uses; test losses and grabs are computed on the
member's own (unstacked) model after its current weights are copied into it. A member that is done, diverged
or at its MAX_ITER leaves the stack at once (the stack is compacted), so it stops changing and its NaNs never
reach another member; its record is then identical in keys to ``run_config``'s and equal in values up to
float32 rounding (batched and single matmuls round differently).

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
    ELEMENTWISE, FUSABLE_MODELS, NUMERIC_KEYS, fuse_key, optimizer_kind, plan_units, stack_key, why_not_fusable)
from modelscape.backend.records import failed_record
from modelscape.backend.trainloop import Evaluations, LossTracker, match_shapes, observers_wanting, read_losses
from modelscape.models import MLP

__all__ = ["run_group", "train_fused", "StackedMLP", "StackedOptimizer", "fuse_cap", "member_bytes"]

log = logging.getLogger(__name__)

CPU_FUSE_MAX = 64  # beyond this a CPU's caches, not launch overhead, set the pace


def fuse_cap(fuse_max: int, device, member_bytes: int = 0) -> int:
    """How many jobs one group may hold: ``fuse_max``, at most ``CPU_FUSE_MAX`` on a CPU, and on CUDA at most
    half of the free device memory over ``member_bytes`` (one member's estimated footprint)."""
    cap = max(1, int(fuse_max))
    device = torch.device(device)
    if device.type != "cuda":
        return min(cap, CPU_FUSE_MAX)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(cap, int(free // 2 // max(int(member_bytes), 1))))


def member_bytes(job: PreparedJob) -> int:
    """Device memory one member of a fused group needs, roughly: its weights six times (stacked, gradient,
    two optimizer states, centering baseline, its own model) and three activations per layer and sample."""
    n_params = sum(p.numel() for p in job.model.parameters())
    width, depth, batch = job.model.width, job.model.depth, job.cfg["N_SAMPLES"]
    return 4 * (6 * n_params + 3 * batch * width * (depth + 1))


def _layers(model: MLP) -> list:
    return [("input_layer", model.input_layer)] + \
        [(f"hidden_layers.{i}", m) for i, m in enumerate(model.hidden_layers)] + [("output_layer", model.output_layer)]


def _scale(module: nn.Module) -> float:
    """The factor ``mup``'s forward hook applies to this module's output (1 without it)."""
    return float(getattr(module, "_mup_mult", 1.0)) / float(getattr(module, "_mup_gamma", 1.0))


# --------------------------------------------------------------------------------------------------------
# The stacked model and optimizer
# --------------------------------------------------------------------------------------------------------

def _column(values, like: torch.Tensor, ndim: int) -> torch.Tensor:
    """Per-member numbers as a tensor of shape (G, 1, ..., 1) that broadcasts against a stacked parameter."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).reshape((-1,) + (1,) * ndim)


class StackedMLP:
    """The members' MLPs as stacked weights: ``forward(params, X)`` maps (G, B, ...) inputs to (G, B, d_out).

    ``params`` follow the model's ``named_parameters`` order, weights transposed to (G, in, out).

    Each layer's output is multiplied by that member's muP/GAMMA factor and the nonlinearity's by its own,
    exactly as ``mup``'s forward hook does on each member's model.
    """

    def __init__(self, models: list):
        first = models[0]
        self.names = [n for n, _ in first.named_parameters()]
        self.act = first.nonlin
        self.layer_params = []  # per layer: (index of weight, index of bias or None) into params
        self.layer_scales = []
        index = {n: i for i, n in enumerate(self.names)}
        for path, layer in _layers(first):
            self.layer_params.append((index[f"{path}.weight"], index.get(f"{path}.bias")))
            scales = [_scale(dict(_layers(m))[path]) for m in models]
            self.layer_scales.append(scales)
        self.act_scales = [_scale(m.nonlin) for m in models]
        per_model = [dict(m.named_parameters()) for m in models]
        # Weights are kept transposed, (G, in, out), so that neither the forward matmul nor the weight gradient
        # (and the optimizer's arithmetic on it) works on a strided view.
        self.transposed = [n.endswith(".weight") for n in self.names]
        self.params = [torch.stack([pm[n].detach().t() if t else pm[n].detach() for pm in per_model])
                       .contiguous().requires_grad_() for n, t in zip(self.names, self.transposed)]
        self._set_scales(self.layer_scales, self.act_scales)

    def _set_scales(self, layer_scales, act_scales):
        self.layer_scales, self.act_scales = layer_scales, act_scales
        like = self.params[0]
        self._layer_t = [None if all(s == 1.0 for s in sc) else _column(sc, like, 2) for sc in layer_scales]
        self._act_t = None if all(s == 1.0 for s in act_scales) else _column(act_scales, like, 2)

    def forward(self, params: list, X: torch.Tensor) -> torch.Tensor:
        h = X.reshape(X.shape[0], X.shape[1], -1)  # MLP.forward flattens each sample
        last = len(self.layer_params) - 1
        for i, ((w, b), scale) in enumerate(zip(self.layer_params, self._layer_t)):
            wt = params[w]
            h = torch.bmm(h, wt) if b is None else torch.baddbmm(params[b].unsqueeze(1), h, wt)
            if scale is not None:
                h = h * scale
            if i < last:
                h = self.act.forward(h)  # .forward: its muP hook is applied here, per member
                if self._act_t is not None:
                    h = h * self._act_t
        return h

    def select(self, keep: list) -> None:
        """Keep only the members at rows ``keep`` (in that order)."""
        idx = torch.tensor(keep, device=self.params[0].device)
        self.params = [p.detach().index_select(0, idx).requires_grad_() for p in self.params]
        self._set_scales([[sc[k] for k in keep] for sc in self.layer_scales], [self.act_scales[k] for k in keep])

    def write_back(self, row: int, model: nn.Module) -> None:
        """Copy member ``row``'s current weights into its own model."""
        with torch.no_grad():
            for stacked, t, p in zip(self.params, self.transposed, model.parameters()):
                p.copy_(stacked[row].t() if t else stacked[row])


class StackedOptimizer:
    """SGD (momentum, weight decay) or Adam/AdamW on stacked parameters, with each member's own per-parameter
    learning rate and constants taken from its optimizer's param groups; the update is torch's, per member."""

    def __init__(self, jobs: list, stack: StackedMLP):
        self.kind = optimizer_kind(jobs[0].opt)
        self.decoupled = type(jobs[0].opt) is torch.optim.AdamW or \
            bool(jobs[0].opt.param_groups[0].get("decoupled_weight_decay"))
        keys = ("lr", "momentum", "weight_decay") if self.kind == "sgd" else ("lr", "beta1", "beta2", "eps",
                                                                            "weight_decay")
        # self.hyper[key][param index] = list over members
        self.hyper = {k: [[] for _ in stack.names] for k in keys}
        for job in jobs:
            group_of = {id(p): g for g in job.opt.param_groups for p in g["params"]}
            for i, p in enumerate(job.model.parameters()):
                g = group_of[id(p)]
                values = dict(g, beta1=g.get("betas", (0, 0))[0], beta2=g.get("betas", (0, 0))[1])
                for k in keys:
                    self.hyper[k][i].append(float(values[k]))
        self.state = [dict() for _ in stack.names]
        self.steps = 0
        self._tensors(stack.params)

    def _tensors(self, params):
        self.t = {k: [_column(v, p, p.ndim - 1) for v, p in zip(vals, params)] for k, vals in self.hyper.items()}
        self.t["neg_lr"] = [-lr for lr in self.t["lr"]]
        self.uses = {k: any(x != 0 for vals in self.hyper[k] for x in vals) for k in self.hyper}

    @torch.no_grad()
    def step(self, params: list, grads: list) -> None:
        self.steps += 1
        for i, (p, g) in enumerate(zip(params, grads)):
            if self.kind == "sgd":
                self._sgd(i, p, g)
            else:
                self._adam(i, p, g)

    def _sgd(self, i, p, g):
        t, state = self.t, self.state[i]
        if self.uses["weight_decay"]:
            g = g + t["weight_decay"][i] * p
        if self.uses["momentum"]:
            buf = state.get("buf")
            if buf is None:
                buf = state["buf"] = g.clone()
            else:
                buf.mul_(t["momentum"][i]).add_(g)
            g = buf
        p.addcmul_(t["neg_lr"][i], g)

    def _adam(self, i, p, g):
        t, state = self.t, self.state[i]
        lr, wd = t["lr"][i], t["weight_decay"][i]
        if self.uses["weight_decay"]:
            if self.decoupled:
                p.mul_(1 - lr * wd)
            else:
                g = g + wd * p
        if "m" not in state:
            state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
        m, v = state["m"], state["v"]
        b1, b2 = t["beta1"][i], t["beta2"][i]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g * (1 - b2))
        b1d, b2d = b1.double(), b2.double()  # bias corrections in double, as torch computes them in Python
        step_size = (lr.double() / (1 - b1d ** self.steps)).to(p.dtype)
        bc2_sqrt = (1 - b2d ** self.steps).sqrt().to(p.dtype)
        denom = (v.sqrt() / bc2_sqrt).add_(t["eps"][i])
        p.sub_(step_size * m / denom)

    def select(self, keep: list, params: list) -> None:
        idx = torch.tensor(keep, device=params[0].device)
        self.hyper = {k: [[vals[j] for j in keep] for vals in per_param] for k, per_param in self.hyper.items()}
        self.state = [{k: s.index_select(0, idx) for k, s in st.items()} for st in self.state]
        self._tensors(params)


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
        self.unread: list[np.ndarray] = []  # losses read back from the device, not yet fed to the tracker
        self.after_sync = observers_wanting(job.observers, "after_sync")
        self.at_end = observers_wanting(job.observers, "at_end")
        self.label = live.axes_label(job.axes)  # prefixes what this member's tracker and grabs print
        self.X = self.y = None


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
    loss_fn, sync = first.loss_fn, int(first.loop_kwargs["sync_every"])
    baseline = [p.detach().clone() for p in stack.params] if first.cfg["CENTER"] else None
    stack_X, stack_Y = _StackCache(), _StackCache()
    f0 = None  # (stacked inputs, baseline output on them): offline, the inputs are the same stack every step
    active = list(range(len(jobs)))  # member index of each row of the stack
    pending: list[torch.Tensor] = []
    step = 0

    def write_back(rows):
        for r in rows:
            stack.write_back(r, members[active[r]].job.model)

    def fail(i, exc):
        job = jobs[i]
        records[i] = failed_record(job.axes, exc, job.device, time.perf_counter() - job.t0)

    while active:
        for r, i in enumerate(active):
            job = members[i].job
            if step:
                members[i].X, members[i].y = job.batch_fn(step)
            else:  # checked as train_loop checks it: a bad batch fails the group, and each job then trains alone
                job.batch_fn, members[i].X, members[i].y = first_batch(job.batch_fn, job.model)
        due = [r for r, i in enumerate(active) if records[i] is None and members[i].evals.due(step)]
        if due:
            write_back(due)
        for r in (due if step else range(len(active))):  # as train_loop: record, or at step 0 check the grabs
            m = members[active[r]]
            live.set_label(m.label)
            try:
                if r in due:
                    m.evals.record(step, m.X, m.y)
                else:
                    m.evals.check(m.X, m.y)
            except Exception as e:
                fail(active[r], e)
        X = stack_X([members[i].X for i in active])
        Y = stack_Y([members[i].y for i in active])
        out = stack.forward(stack.params, X)
        if baseline is not None:
            if f0 is None or f0[0] is not X:
                with torch.no_grad():
                    f0 = (X, stack.forward(baseline, X))
            out = out - f0[1]
        losses = _per_member_loss(loss_fn, out, Y)
        grads = torch.autograd.grad(losses.sum(), stack.params)
        opt.step(stack.params, grads)
        pending.append(losses.detach())
        step += 1
        # A member reads its losses every `sync` steps and at its MAX_ITER, as train_loop does.
        syncing = [r for r, i in enumerate(active) if step % sync == 0 or step >= members[i].max_iter]
        if not syncing:
            continue
        block = read_losses(pending).reshape(len(pending), -1)  # (steps, rows)
        pending.clear()
        for r, i in enumerate(active):
            members[i].unread.append(block[:, r])
        leaving = []
        for r in syncing:
            i = active[r]
            m = members[i]
            new = np.concatenate(m.unread)
            m.unread.clear()
            live.set_label(m.label)
            stop = m.tracker.feed(new)
            if m.tracker.status == "diverged":  # NaN that came with the data is the data's fault: say so
                note = nonfinite(m.X, m.y, m.job.batch_fn, step - 1)
                if note:
                    log.warning("fused trials: job %s diverged with its data: %s", m.label, note)
            try:
                for fn in m.after_sync:
                    fn(step, m.tracker, m.evals)
            except Exception as e:
                fail(i, e)
            if stop or step >= m.max_iter:
                leaving.append(r)
        leaving += [r for r, i in enumerate(active) if records[i] is not None and r not in leaving]  # failed
        if not leaving:
            continue
        write_back([r for r in leaving if records[active[r]] is None])
        for r in leaving:
            i = active[r]
            if records[i] is not None:
                continue
            m = members[i]
            try:
                out_i = m.evals.result(m.tracker, step, m.X, m.y)
                for fn in m.at_end:
                    fn(out_i, m.job.model, m.job.opt)
                # wall time: this member's share of the group's time so far
                records[i] = finish_record(m.job, out_i, (time.perf_counter() - t0) / len(jobs))
            except Exception as e:
                fail(i, e)
        keep = [r for r in range(len(active)) if r not in leaving]
        active = [active[r] for r in keep]
        if active:
            stack.select(keep)
            opt.select(keep, stack.params)
            if baseline is not None:
                idx = torch.tensor(keep, device=baseline[0].device)
                baseline = [b.index_select(0, idx) for b in baseline]
                f0 = None
    return records


# --------------------------------------------------------------------------------------------------------
# A group of jobs, as the sweep engine runs it
# --------------------------------------------------------------------------------------------------------

def run_group(jobs: list, bfn_config: dict, device="cpu", *, resolved: bool = False) -> list:
    """Run ``jobs`` (a list of ``(config, axes)``) fused where possible; one record per job, in order.

    Every job is prepared as ``run_config`` prepares it (``resolved``: the configs are resolved already, as the
    sweep engine ships them, and are prepared as ``run_resolved`` prepares them). One that cannot be fused
    (``why_not_fusable``; one note in the log per reason) is trained at once, alone, as ``run_config`` would; the
    others are trained as one stacked model per shape by ``train_fused``. Never raises: a job that fails gets a
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
        first = prepared[same[0]]
        cap = fuse_cap(first.cfg["FUSE_MAX"], device, member_bytes(first))
        for ks in (same[c:c + cap] for c in range(0, len(same), cap)):
            if len(ks) == 1:  # a fusable model draws nothing from the global RNG: training it later is the same
                records[ks[0]] = _train_alone(prepared[ks[0]])
                continue
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
    return records


def _train_alone(job: PreparedJob) -> dict:
    """``train_prepared`` that never raises, as ``run_config_safe``."""
    live.set_label(live.axes_label(job.axes))
    try:
        return train_prepared(job)
    except Exception as e:
        return failed_record(job.axes, e, job.device, time.perf_counter() - job.t0)
