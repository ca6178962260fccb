"""Which jobs may train fused, and a sweep's units of work: every rule about fusing, written once.

Jobs that share every shape but the hidden width (model class, depth, batch size, data shapes) and differ only in
numbers (``NUMERIC_KEYS``: trial seed, LR, GAMMA, PARAMETERIZATION, momentum, thresholds ...) and in WIDTH can train
as one stacked model (``fused``), each member padded to the widest of its group. Widths share a group only within a
bucket (``width_buckets``: within ``WIDTH_RATIO`` of the bucket's smallest), which bounds the arithmetic padding
wastes. The driver plans from configs alone (``config_reason``, ``plan_units``); the worker checks the built jobs
again (``why_not_fusable``: what only the built model, optimizer and loss can tell) and groups them by
``stack_key`` and width bucket. Anything that cannot fuse runs one job at a time, with one note in the log saying
why.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from modelscape import model as original_model
from modelscape.backend import checkpoints
from modelscape.backend.build import get_model_class, resolve_optimizer
from modelscape.models import MLP
from modelscape.mup import scale_output

__all__ = ["NUMERIC_KEYS", "PADDED_KEYS", "WIDTH_RATIO", "FUSABLE_MODELS", "ELEMENTWISE", "optimizer_kind",
           "fuse_key", "config_reason", "why_not_fusable", "stack_key", "width_buckets", "plan_units"]

log = logging.getLogger("modelscape.backend.fused")  # the notes keep the logger name users filter on

# Config keys that change only numbers inside a job, never a shape or the code path: jobs that differ only
# in these (and the trial) may be fused. Everything else must be equal.
NUMERIC_KEYS = frozenset({"trial", "SEED", "LR", "GAMMA", "PARAMETERIZATION", "MOMENTUM", "WEIGHT_DECAY",
                          "LOSS_CHECKPOINTS", "EMA_SMOOTHER", "MAX_ITER", "RELATIVE_THRESHOLDS", "RELU_GAIN",
                          "VERBOSE",
                          # muP's: multipliers, per-group learning rates and eps, inits, which StackedMLP and
                          # StackedOptimizer read from each member's modules and param groups (test_fused checks)
                          "BASE_WIDTH", "OUTPUT_MULT", "EMB_MULT", "EMB_LR_MULT", "HIDDEN_LR_MULT",
                          "READOUT_LR_MULT", "VECTOR_LR_MULT", "READOUT_ZERO_INIT", "EPS_SCALING"})
# Config keys that change only the hidden width: jobs that differ in them may be fused too, each member padded with
# zeros to the group's widest (and masked), within a width bucket (``width_buckets``).
PADDED_KEYS = frozenset({"WIDTH"})
# A width bucket holds the widths from its smallest, w, up to WIDTH_RATIO * w. A member of width w padded to W
# computes as one of width W: (W / w)^2 its own hidden-layer arithmetic (at most 4x) and W / w at the read-in and
# read-out (at most 2x).
WIDTH_RATIO = 2
ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.GELU, nn.SiLU, nn.Identity, nn.Sigmoid)
# The MLPs whose forward StackedMLP reproduces: ours, and the original's (the default MODEL), a subclass that
# only adds an init option and a method.
FUSABLE_MODELS = (MLP, original_model.MLP)
# The optimizers StackedOptimizer reproduces, by the update rule it applies.
_OPTIMIZER_KINDS = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}


def optimizer_kind(opt) -> str | None:
    """'sgd' or 'adam' for an optimizer (class or instance) the fused trainer reproduces, else None."""
    return _OPTIMIZER_KINDS.get(opt if isinstance(opt, type) else type(opt))


# --------------------------------------------------------------------------------------------------------
# The rules, each once: the driver applies them to configs, the worker to built jobs
# --------------------------------------------------------------------------------------------------------

def _model_rule(cls) -> str | None:
    if cls not in FUSABLE_MODELS:
        return f"model {getattr(cls, '__name__', cls)} is not the built-in MLP"
    return None


def _hook_rule(cfg) -> str | None:
    if cfg.get("post_init_fn") is not None or cfg.get("POST_INIT_FN") is not None:
        return "a post_init_fn may change the model in ways the fused trainer cannot see"
    return None


def _optimizer_rule(cls) -> str | None:
    if optimizer_kind(cls) is None:
        return f"optimizer {getattr(cls, '__name__', cls)} is not SGD, Adam or AdamW"
    return None


def _between_steps_rule(cfg) -> str | None:
    """Features that act on a job's own model or optimizer between steps; a fused member's weights and optimizer
    state live in the stack then (the observers they add say the same to ``_observer_rule``)."""
    if cfg.get("step_hooks"):
        return "step_hooks act on the model between steps"
    steps, thresholds, _ = checkpoints.plan(cfg)
    if steps or thresholds:
        return "CHECKPOINTS at steps or thresholds read the model between steps"
    if cfg.get("CHECKPOINT_OPTIMIZER") and cfg.get("CHECKPOINTS"):
        return "CHECKPOINT_OPTIMIZER needs the job's own optimizer state"
    return None


def _observer_rule(observers) -> str | None:
    acting = [type(o).__name__ for o in observers if o.wants("before_step")]
    if acting:  # between steps a member's weights live in the stack, not in its module
        return f"{', '.join(acting)} acts on the model before steps"
    unfusable = [type(o).__name__ for o in observers if not o.fusable]
    if unfusable:
        return f"{', '.join(unfusable)} needs the job's own optimizer state"
    return None


def config_reason(cfg: dict) -> str | None:
    """Why a job's resolved config rules fusing out before anything is built (None if it may fuse)."""
    if cfg.get("MODEL_FILE"):
        return f"model {cfg.get('MODEL_NAME')} (MODEL_FILE) is not the built-in MLP"
    try:
        model_cls = get_model_class(cfg)
        opt_cls = resolve_optimizer(cfg.get("OPTIMIZER"))
    except (ValueError, TypeError):
        return None  # the job itself will fail, naming the key
    return _model_rule(model_cls) or _hook_rule(cfg) or _between_steps_rule(cfg) or _optimizer_rule(opt_cls)


def why_not_fusable(job) -> str | None:
    """None if the prepared job (``job.PreparedJob``) can be trained in a fused group, else the reason (for the
    log): the config's rules on what was built, and what only the built model, optimizer and loss tell."""
    model, cfg = job.model, job.cfg
    reason = _model_rule(type(model)) or _hook_rule(cfg) or _observer_rule(job.observers) \
        or _optimizer_rule(type(job.opt))
    if reason is not None:
        return reason
    if not isinstance(model.nonlin, ELEMENTWISE):
        return f"nonlinearity {type(model.nonlin).__name__} is not one of {[c.__name__ for c in ELEMENTWISE]}"
    for path, mod in model.named_modules():
        if mod._forward_pre_hooks or any(h is not scale_output for h in mod._forward_hooks.values()):
            return f"module {path or '<model>'!r} has forward hooks other than muP's"
    for g in job.opt.param_groups:
        if g.get("maximize") or g.get("amsgrad") or g.get("nesterov") or g.get("dampening", 0):
            return "the optimizer uses maximize, amsgrad, nesterov or dampening"
    in_opt = {id(p) for g in job.opt.param_groups for p in g["params"]}
    if any(id(p) not in in_opt for p in model.parameters()):
        return "some model parameters are not in the optimizer"
    loss = job.loss_fn
    if type(loss) not in (nn.MSELoss, nn.CrossEntropyLoss) or loss.reduction != "mean":
        return f"loss {type(loss).__name__} is not MSELoss or CrossEntropyLoss with reduction='mean'"
    if isinstance(loss, nn.CrossEntropyLoss) and (loss.weight is not None or loss.label_smoothing):
        return "cross-entropy with class weights or label smoothing"
    return None


def stack_key(job):
    """What must be equal for two fusable prepared jobs to share a stack (their widths then go by
    ``width_buckets``): every parameter's name, the data's dimensions at the read-in and read-out, and the rest."""
    lk, model = job.loop_kwargs, job.model
    return (tuple(n for n, _ in model.named_parameters()), model.input_layer.in_features,
            model.output_layer.out_features, repr(model.nonlin),
            optimizer_kind(job.opt), type(job.opt).__name__, type(job.loss_fn).__name__, str(job.device),
            job.cfg["CENTER"], job.cfg["ONLINE"], lk["only_thresholds"], lk["eval_every"], lk["sync_every"],
            None if job.X_te is None else tuple(job.X_te.shape))


def width_buckets(widths: list) -> list:
    """The positions of ``widths`` in buckets that may share a stack: the smallest width w not yet placed opens a
    bucket holding every width up to ``WIDTH_RATIO * w``. Buckets and the positions in each are in order of width
    (then position), so a cut of a bucket into pieces keeps near widths together."""
    order = sorted(range(len(widths)), key=lambda k: (widths[k], k))
    buckets = []
    for k in order:
        if buckets and widths[k] <= WIDTH_RATIO * widths[buckets[-1][0]]:
            buckets[-1].append(k)
        else:
            buckets.append([k])
    return buckets


# --------------------------------------------------------------------------------------------------------
# The sweep's units of work
# --------------------------------------------------------------------------------------------------------

def fuse_key(cfg: dict):
    """A hashable summary of everything in a job's resolved config but ``NUMERIC_KEYS`` and ``PADDED_KEYS``: jobs
    with equal keys are candidates for one fused group, by width bucket (the worker still checks their built
    models)."""
    return tuple(sorted((k, _hashable(v)) for k, v in cfg.items() if k not in NUMERIC_KEYS and k not in PADDED_KEYS))


def _hashable(v):
    if isinstance(v, (str, int, float, bool, type(None))):
        return v
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((str(k), _hashable(x)) for k, x in v.items()))
    return ("object", id(v))  # functions, tensors, classes: the sweep shares one object across its jobs


def _width(cfg: dict) -> int:
    return int(cfg["WIDTH"])


def plan_units(jobs: list, todo=None, units=None, workers: int = 1, previous=None) -> list:
    """Split a sweep's jobs into units of work: lists of job indices, each a fused group or a single job.

    ``jobs`` is a list of ``(index, resolved config)``. Jobs with FUSE=auto and equal ``fuse_key`` are candidates
    for a group; their widths are put in buckets (``width_buckets``), and each bucket is cut into balanced pieces
    (near widths together) of at most FUSE_MAX jobs and at most the pool's share, the jobs planned divided by
    ``workers`` (rounded up), so that a sweep of one fusable group keeps every worker busy. Jobs that cannot fuse
    are single units; the reason is logged once per reason.

    A member's float32 rounding can depend on its group, so a resumed sweep must train each missing group with
    the members the first run gave it: its numbers are then the first run's to the bit. Since the pieces depend on
    ``workers``, that plan is recorded (the engine keeps it in the store) and handed back as ``previous``: its
    units all of whose jobs are in ``todo`` (indices; default all) and that still fuse under today's configs (a
    lower FUSE_MAX or FUSE=off is obeyed) are kept as they are; the other jobs to run are planned anew. Without
    ``previous`` the whole sweep is planned and the units of jobs in ``todo`` kept the same way. ``units``: the
    plan made before by this sweep's driver (a Slurm shard gets its part of the sweep's), kept as it is; its
    reasons were logged then.
    """
    configs = dict(jobs)
    todo = set(configs) if todo is None else set(todo)
    if units is not None:
        kept, reasons = [u for u in units if todo.issuperset(u)], {}
    elif previous is not None:
        kept = [list(u) for u in previous if todo.issuperset(u) and _still_fuses(u, configs)]
        reasons = _reasons(todo, configs)
    else:
        kept = [u for u in _plan(list(configs), configs, workers) if todo.issuperset(u)]
        reasons = _reasons(todo, configs)
    placed = {i for u in kept for i in u}
    rest = sorted(i for i in todo if i not in placed)
    units = kept + (_plan(rest, configs, workers) if rest else [])
    for reason, n in reasons.items():
        log.warning("fused trials: %d job(s) run one by one: %s", n, reason)
    return sorted(units)


def _reasons(indices, configs) -> dict:
    """``{reason a job is not fused: count}`` among ``indices`` (jobs with FUSE=off are not counted)."""
    reasons = {}
    for index in indices:
        cfg = configs[index]
        if cfg.get("FUSE", "auto") == "auto":
            reason = config_reason(cfg)
            if reason is not None:
                reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


def _still_fuses(unit, configs) -> bool:
    """Whether a unit recorded by an earlier run may be trained as one group under today's configs."""
    if any(i not in configs for i in unit):
        return False
    if len(unit) == 1:
        return True
    cfgs = [configs[i] for i in unit]
    key = fuse_key(cfgs[0])
    widths = [_width(c) for c in cfgs]
    return (all(c.get("FUSE", "auto") == "auto" and config_reason(c) is None and fuse_key(c) == key for c in cfgs)
            and len(unit) <= max(1, int(cfgs[0].get("FUSE_MAX", 64))) and max(widths) <= WIDTH_RATIO * min(widths))


def _plan(indices: list, configs: dict, workers: int) -> list:
    """``plan_units``' grouping of ``indices``, with at most ``ceil(len(indices) / workers)`` jobs in a group."""
    groups, units = {}, []
    share = max(1, -(-len(indices) // max(1, int(workers))))
    for index in indices:
        cfg = configs[index]
        if cfg.get("FUSE", "auto") != "auto" or config_reason(cfg) is not None:
            units.append([index])
            continue
        groups.setdefault(fuse_key(cfg), []).append(index)
    for key, members in groups.items():
        cap = min(share, max(1, int(dict(key).get("FUSE_MAX", 64))))
        for bucket in width_buckets([_width(configs[i]) for i in members]):
            bucket = [members[k] for k in bucket]
            pieces = -(-len(bucket) // cap)
            bounds = [len(bucket) * k // pieces for k in range(pieces + 1)]
            units += [bucket[a:b] for a, b in zip(bounds, bounds[1:])]
    return units
