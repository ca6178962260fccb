"""One job: seeds, data, model, parameterization, observers, trainloop, result record.

Two doors: ``run_config`` / ``prepare_job`` take a raw config (aliases, defaults missing, as a user writes it)
and resolve it (``resolve_config``); the sweep engine resolves every config once, in the driver, and the worker
calls ``run_resolved`` / ``prepare_resolved`` with it. At the bottom, the original modelscape's ``run_job``: its
face over ``run_config``.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from modelscape import mup
from modelscape.backend.build import (  # noqa: F401  (ctor_kwargs, resolve_names ...: re-exported, they lived here in 0.3)
    BFN_KEYS, call_post_init, consumers, ctor_kwargs, get_base_bfn, get_model_class, optimizer_names, resolve_loss,
    resolve_loss_class, resolve_names, resolve_optimizer)
from modelscape.backend.checkpointer import job_observers as checkpoint_observers
from modelscape.backend.inputs import first_batch
from modelscape.backend.interventions import check_step_hooks, step_hooks_observers
from modelscape.backend import live
from modelscape.backend.live import live_observers
from modelscape.backend.records import failed_record
from modelscape.backend.tensorboard import tensorboard_observers
from modelscape.backend.trainloop import GRAB_ARGS, train_loop
from modelscape.config import BY_NAME, ConfigError, axis_target, canonicalize, check_job_config, signature_names
from modelscape.model import MLP  # the default model; looked up here at call time (the original's tests patch it)
from modelscape.models import Centered
from modelscape.utils import check_paths, derive_seed, ensure_torch, qualname, resolve_device

__all__ = ["PreparedJob", "resolve_config", "check_resolved", "check_bfn_config", "prepare_job", "prepare_resolved",
           "job_observers", "train_prepared", "finish_record", "run_config", "run_resolved", "run_config_safe",
           "run_resolved_safe", "run_job"]


def check_bfn_config(bfn_config: dict) -> None:
    """ConfigError for what does not belong in ``bfn_config``."""
    if "step_hooks" in bfn_config:
        raise ConfigError("step_hooks is in bfn_config; it belongs in the config (global_config), beside "
                          "otherreturns: bfn_config holds the batch function and its arguments")


def check_resolved(cfg: dict) -> None:
    """The checks a resolved config must pass before its job runs: ``config.check_job_config`` (ranges, scalars
    where a job needs scalars), EXPT_NAME and JOB_ID as plain names (``utils.check_paths``) and the step hooks'
    own rules (``interventions.check_step_hooks``)."""
    check_job_config(cfg)
    check_paths(cfg)
    if cfg.get("step_hooks"):
        check_step_hooks(cfg["step_hooks"], cfg)


def resolve_config(config: dict, bfn_config: dict, quiet: bool = False) -> dict:
    """A raw config as the job reads it: canonicalized (aliases, defaults, types; a key close to a schema key
    and named by no model, batch function or grab is an error) and checked (``check_resolved``)."""
    check_bfn_config(bfn_config)
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        cfg = canonicalize(config, consumers(config, bfn_config), where="config")
    check_resolved(cfg)
    return cfg


def _is_cross_entropy(loss_fn):
    return isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is nn.functional.cross_entropy


def _model_kwargs(model_cls, cfg, X, y, loss_fn, y_tr=None):
    names = signature_names(model_cls)
    hints = {}
    if X.ndim == 4:
        hints.update(in_channels=X.shape[1], img_size=X.shape[-1])
    hints["d_in"] = X.shape[-1] if X.ndim in (2, 3) else int(np.prod(X.shape[1:]))
    if _is_cross_entropy(loss_fn) and not y.is_floating_point():
        hints["d_out"] = max(int(y.max()), int(y_tr.max()) if y_tr is not None else 0) + 1
    else:
        hints["d_out"] = 1 if y.ndim == 1 else int(np.prod(y.shape[1:]))
    kwargs = {}
    for p in names:
        if p in cfg:
            kwargs[p] = cfg[p]
        elif p.upper() in BY_NAME and p.upper() in cfg:
            kwargs[p] = cfg[p.upper()]
        elif p in hints:
            kwargs[p] = hints[p]
    return kwargs


@dataclass
class PreparedJob:
    """One job ready to train: its resolved config, data, built and parameterized model, optimizer and loss.

    ``net`` is the function trained (``Centered(model)`` under CENTER), ``model`` the user's model (what grabs
    receive). ``loop_kwargs`` are ``train_loop``'s keyword arguments for this job. ``run_config`` is
    ``train_prepared(prepare_job(...))``; the fused trainer prepares several jobs the same way.
    """

    cfg: dict
    axes: dict
    device: torch.device
    trial: int
    seed: int
    model: nn.Module
    net: nn.Module
    opt: torch.optim.Optimizer
    loss_fn: object
    batch_fn: object
    X_tr: object
    y_tr: object
    X_te: object
    y_te: object
    loop_kwargs: dict
    t0: float
    observers: list = field(default_factory=list)  # LoopObservers: live progress, TensorBoard, checkpoints, hooks
    # (class, constructor kwargs) the model was built with: how a checkpoint describes it to be built again
    model_spec: tuple | None = None


def prepare_job(config: dict, bfn_config: dict, device="cpu", axes: dict | None = None,
                quiet: bool = False) -> PreparedJob:
    """Everything of ``run_config`` before the step loop: config checks, seeds, data, model, optimizer."""
    t0 = time.perf_counter()
    bfn_config = dict(bfn_config or {})
    return prepare_resolved(resolve_config(config, bfn_config, quiet), bfn_config, device, axes, t0)


def prepare_resolved(cfg: dict, bfn_config: dict, device="cpu", axes: dict | None = None,
                     t0: float | None = None) -> PreparedJob:
    """``prepare_job`` for a config already resolved (``resolve_config``, or the driver's per-job config).

    Seeds derive from SEED and the trial index only: the test set, the offline training set and the initial
    weights are the same for every job of a trial where shapes allow. The torch global RNG is seeded here.
    """
    t0 = time.perf_counter() if t0 is None else t0
    axes = dict(axes or {})
    bfn_config = dict(bfn_config or {})
    device = resolve_device(device)
    trial = int(axes.get("trial", cfg.get("trial", 0)))
    base_seed = cfg["SEED"] if cfg["DETERMINISTIC"] else int.from_bytes(os.urandom(8), "little") >> 1
    if torch.are_deterministic_algorithms_enabled() != cfg["DETERMINISTIC"]:  # the call is slow the first time
        torch.use_deterministic_algorithms(cfg["DETERMINISTIC"], warn_only=True)
    data_seed, init_seed = derive_seed(base_seed, trial, "data"), derive_seed(base_seed, trial, "init")
    torch.manual_seed(init_seed)
    np.random.seed(init_seed % 2**32)
    gen = torch.Generator(device=device).manual_seed(data_seed)

    base_bfn = get_base_bfn(bfn_config)
    bfn_kwargs = {k: v for k, v in bfn_config.items() if k not in BFN_KEYS}
    named = signature_names(base_bfn) - {"bsz", "gen", "X", "y"}
    # bfn_config holds defaults; a config key it lacks, then this job's axis values, override them
    bfn_kwargs.update({k: cfg[k] for k in named - set(bfn_kwargs) if k in cfg})
    bfn_kwargs.update({k: v for k, v in axes.items() if k in named})

    def make_bfn(n, X=None, y=None):
        return base_bfn(bsz=n, gen=gen, X=X, y=y, **bfn_kwargs)

    if cfg.get("X_te") is not None and cfg.get("y_te") is not None:
        X_te, y_te = ensure_torch(cfg["X_te"], device), ensure_torch(cfg["y_te"], device)
    else:  # checked as the loop checks its first batch: a bad batch function is named before anything trains
        _, X_te, y_te = first_batch(make_bfn(cfg["N_TEST"]), device, what="test set")
    n = cfg["N_SAMPLES"]
    if cfg["ONLINE"]:
        X_tr = y_tr = None
        batch_fn = make_bfn(n)
    else:
        _, X_tr, y_tr = first_batch(make_bfn(n), device, what="training set")
        batch_fn = make_bfn(n, X_tr, y_tr)

    loss_fn = resolve_loss(cfg["LOSS"], cfg)
    model_cls = get_model_class(cfg, mlp=MLP)  # MLP read at call time: the original's tests patch it
    torch.manual_seed(init_seed)
    model_kwargs = _model_kwargs(model_cls, cfg, X_te, y_te, loss_fn, y_tr)
    model = model_cls(**model_kwargs).to(device)

    opt_cls = resolve_optimizer(cfg["OPTIMIZER"])
    opt_kwargs = {**ctor_kwargs(opt_cls, cfg, skip=("params", "lr", "momentum", "weight_decay")),
                  **cfg["OPTIMIZER_KWARGS"]}
    opt_names = signature_names(opt_cls)
    for key, arg in (("MOMENTUM", "momentum"), ("WEIGHT_DECAY", "weight_decay")):
        if cfg[key]:
            if arg not in opt_names:
                raise ValueError(f"{key}={cfg[key]} but optimizer {qualname(opt_cls)} takes no {arg!r}")
            opt_kwargs.setdefault(arg, cfg[key])
    gamma, hook = cfg["GAMMA"], cfg.get("post_init_fn")
    param = cfg["PARAMETERIZATION"]
    if param == "auto":  # a hook parameterizes the model itself (the original's mupify hooks do)
        param = "sp" if hook is not None else "mup"
    rule = _update_rule(cfg, param, opt_cls)
    # A slice of data the model trains or is tested on: the forward pass that checks the read-in / read-out
    # must not draw from the batch function's generator.
    example = (X_tr if X_tr is not None else X_te)[:8]
    if cfg["DEPTH_ALPHA"] and not mup.residual_blocks(model):
        raise ConfigError(f"DEPTH_ALPHA={cfg['DEPTH_ALPHA']} but model {qualname(model_cls)} declares no residual "
                          "blocks: DEPTH_ALPHA scales residual branches, which the built-in GPT and Transformer have "
                          "and an MLP or CNN has not (a model of your own declares them with residual_branches; "
                          "see modelscape.mup.depth)")
    opt = mup.parameterize(model, param, opt_cls, mup.gamma_lr(cfg["LR"], gamma, rule or opt_cls),
                           relu_gain=cfg["RELU_GAIN"], update_rule=rule, example_input=example,
                           **_mup_options(cfg, param, model_cls, model_kwargs), **opt_kwargs)
    hook_rescales = False
    if hook is not None:
        model, opt, hook_rescales = _post_init(cfg, model, opt)
    if not hook_rescales:  # GAMMA divides the output exactly once: here, or in a hook that takes ``gamma``
        mup.rescale(model, gamma)

    net = model
    if cfg["CENTER"]:
        net = Centered(model)
        for t in (X_tr, X_te):
            if t is not None:
                net.remember(t)

    sync = cfg["SYNC_EVERY"] or (16 if device.type == "cuda" else 1)
    grab_kwargs = {k: v for k, v in cfg.items() if k not in GRAB_ARGS and k not in ("otherreturns", "step_hooks")}
    grab_kwargs["trial"] = trial
    # Grabs get the user's model, as in the seed; the function actually trained (f - f0) comes along too.
    grab_kwargs["trained_model"] = net
    loop_kwargs = dict(max_iter=cfg["MAX_ITER"], thresholds=cfg["LOSS_CHECKPOINTS"],
                       relative=cfg["RELATIVE_THRESHOLDS"], ema_smoother=cfg["EMA_SMOOTHER"], X_te=X_te, y_te=y_te,
                       only_thresholds=cfg["ONLYTHRESHOLDS"], eval_every=cfg["EVAL_EVERY"], sync_every=sync,
                       grabs=cfg.get("otherreturns"), grab_kwargs=grab_kwargs, grab_model=model,
                       verbose=cfg["VERBOSE"], cuda_graphs=cfg["CUDA_GRAPHS"], label=live.axes_label(axes))
    job = PreparedJob(cfg, axes, device, trial, base_seed, model, net, opt, loss_fn, batch_fn, X_tr, y_tr, X_te,
                      y_te, loop_kwargs, t0, model_spec=(model_cls, model_kwargs))
    job.observers = job_observers(job)
    return job



def job_observers(job: PreparedJob) -> list:
    """The ``LoopObserver``s of a prepared job, in the order they are called at each point: interventions first
    (they change the model a step sees), then what saves or reports it. Each feature decides from the job's
    config (and, for live progress, the process) whether it watches at all."""
    return (step_hooks_observers(job) + checkpoint_observers(job) + tensorboard_observers(job)
            + live_observers(job))


def finish_record(job: PreparedJob, out: dict, wall_time: float | None = None) -> dict:
    """``train_loop``'s result plus the job's identity fields: axes, device, seed, trial, wall time."""
    out.update(axes=job.axes, error=None, device=str(job.device), seed=job.seed, trial=job.trial,
               wall_time=time.perf_counter() - job.t0 if wall_time is None else wall_time)
    return out


def train_prepared(job: PreparedJob) -> dict:
    """Train a prepared job with ``train_loop`` and return its result record."""
    out = train_loop(job.net, job.batch_fn, job.opt, job.loss_fn, observers=job.observers, **job.loop_kwargs)
    return finish_record(job, out)


def run_config(config: dict, bfn_config: dict, device="cpu", axes: dict | None = None, quiet: bool = False) -> dict:
    """Train one configuration end to end on ``device`` and return its result record (a plain dict).

    ``config`` holds hyperparameters and user keys (axis values already merged in); ``axes`` the sweep-axis
    values of this job (``trial`` among them). Seeds derive from SEED and the trial index only: the test set,
    the offline training set and the initial weights are the same for every job of a trial where shapes allow.
    Exceptions propagate; ``run_config_safe`` turns them into a ``failed`` record.
    """
    return train_prepared(prepare_job(config, bfn_config, device, axes, quiet))


def run_resolved(cfg: dict, bfn_config: dict, device="cpu", axes: dict | None = None) -> dict:
    """``run_config`` for a config already resolved."""
    return train_prepared(prepare_resolved(cfg, bfn_config, device, axes))


def run_config_safe(config: dict, bfn_config: dict, device="cpu", axes: dict | None = None,
                    quiet: bool = True) -> dict:
    """``run_config`` that never raises: an exception becomes a ``failed`` record with its traceback."""
    t0 = time.perf_counter()
    try:
        return run_config(config, bfn_config, device, axes, quiet=quiet)
    except Exception as e:  # one bad job must not sink a sweep
        return failed_record(axes, e, device, time.perf_counter() - t0)


def run_resolved_safe(cfg: dict, bfn_config: dict, device="cpu", axes: dict | None = None) -> dict:
    """``run_resolved`` that never raises: an exception becomes a ``failed`` record with its traceback."""
    t0 = time.perf_counter()
    try:
        return run_resolved(cfg, bfn_config, device, axes)
    except Exception as e:  # one bad job must not sink a sweep
        return failed_record(axes, e, device, time.perf_counter() - t0)


def _update_rule(cfg, param, opt_cls):
    """UPDATE_RULE if declared, else None (parameterize reads the rule from the optimizer class). An optimizer
    with no known rule is a ConfigError naming it (a wrong rule mis-scales every layer): mupify applied SGD's
    rule to every optimizer, and UPDATE_RULE='sgd' does so again."""
    if cfg["UPDATE_RULE"] != "auto":
        return cfg["UPDATE_RULE"]
    if param == "sp":
        return None
    try:
        mup.update_rule_of(opt_cls)
    except ValueError as e:
        raise ConfigError(f"OPTIMIZER={qualname(opt_cls)} with PARAMETERIZATION={cfg['PARAMETERIZATION']!r}: {e} "
                          "In a config: UPDATE_RULE='sgd' (as mupify) or 'adam'.") from None
    return None


MUP_KEYS = ("BASE_WIDTH", "DEPTH_ALPHA", "BASE_DEPTH", "OUTPUT_MULT", "ATTN_MULT", "EMB_MULT", "EMB_LR_MULT",
            "HIDDEN_LR_MULT", "READOUT_LR_MULT", "VECTOR_LR_MULT", "READOUT_ZERO_INIT", "QUERY_ZERO_INIT",
            "EPS_SCALING")


def _width_factory(model_cls, model_kwargs):
    """``width -> model`` for a model class whose constructor takes ``width`` (or WIDTH), else None."""
    key = next((k for k in ("width", "WIDTH") if k in model_kwargs), None)
    if key is None:
        return None
    return lambda w: model_cls(**{**model_kwargs, key: w})


def _mup_options(cfg, param, model_cls, model_kwargs) -> dict:
    """``parameterize``'s keyword arguments from the config's muP keys: the base model at BASE_WIDTH (built on
    the meta device), a probe at twice the width so muP knows which dimensions grow, and the multipliers."""
    if cfg["ATTN_MULT"] != 1 and "attn_mult" not in signature_names(model_cls):
        raise ConfigError(f"ATTN_MULT={cfg['ATTN_MULT']} but model {qualname(model_cls)} takes no attn_mult; the "
                          "built-in Transformer and GPT do (a model of your own passes it to its attention modules)")
    out = dict(output_mult=cfg["OUTPUT_MULT"], emb_mult=cfg["EMB_MULT"],
               lr_mults={"embedding": cfg["EMB_LR_MULT"], "hidden": cfg["HIDDEN_LR_MULT"],
                         "readout": cfg["READOUT_LR_MULT"], "vector": cfg["VECTOR_LR_MULT"]},
               readout_zero_init=cfg["READOUT_ZERO_INIT"], query_zero_init=cfg["QUERY_ZERO_INIT"],
               eps_scaling=cfg["EPS_SCALING"], gamma=cfg["GAMMA"], depth_alpha=cfg["DEPTH_ALPHA"],
               base_depth=cfg["BASE_DEPTH"])
    knobs_default = all(cfg[k] == BY_NAME[k].default for k in MUP_KEYS if k not in ("BASE_WIDTH", "BASE_DEPTH"))
    if param == "sp" and knobs_default:
        return out
    factory = _width_factory(model_cls, model_kwargs)
    base_width, width = cfg["BASE_WIDTH"], model_kwargs.get("width", model_kwargs.get("WIDTH"))
    if base_width is not None and param != "sp":
        if factory is None:
            raise ConfigError(f"BASE_WIDTH={base_width} but model {qualname(model_cls)} takes no width argument, so "
                              "modelscape cannot build it at the base width; call modelscape.mup.parameterize with "
                              "base= in a post_init_fn instead")
        try:
            shapes, d_heads = mup.build_shapes(lambda: factory(base_width))
        except Exception as e:  # the user's constructor, at a width the user chose: say which key led there
            raise ConfigError(f"BASE_WIDTH={base_width}: building {qualname(model_cls)} at the base width failed "
                              f"({type(e).__name__}: {e}); choose a BASE_WIDTH the model can be built at") from e
        out["base"] = mup.Shapes(shapes, None, d_heads)
    if factory is not None and (base_width is None or base_width == width or param == "sp"):
        built = mup.build_shapes(lambda: factory(2 * width), fallback_cpu=False)
        if built is not None:
            out["probe"] = built[0]
    return out


def _post_init(cfg, model, opt):
    """Run the user's ``post_init_fn`` as the original did: it gets ``model``, ``opt``, ``lr`` and the config
    keys its signature names (all of them if it takes ``**kwargs``), plus ``gamma`` = GAMMA if it names
    ``gamma``; it returns ``(model, opt)`` or works in place. Returns ``(model, opt, hook_rescales)``: a hook
    whose signature names ``gamma`` (or ``GAMMA``) divides the output by it itself (``rescale(model, gamma)``),
    so the caller must not; ``**kwargs`` alone does not count."""
    inputs = {**cfg, "lr": cfg["LR"]}
    takes_gamma = bool({"gamma", "GAMMA"} & signature_names(cfg["post_init_fn"]))
    if takes_gamma:
        inputs["gamma"] = cfg["GAMMA"]
    model, opt = call_post_init(cfg["post_init_fn"], model, opt, inputs)
    return model, opt, takes_gamma


# --------------------------------------------------------------------------------------------------------
# The original modelscape's face: run_job(device_id, job, global_config, bfn_config, iterator_names)
# --------------------------------------------------------------------------------------------------------

def run_job(device_id, job, global_config, bfn_config, iterator_names, job_index=0, **kwargs):
    """Run one job of a sweep, as the original's ``run_job``, through ``run_config``.

    ``job`` is a tuple of axis values named by ``iterator_names`` (``ntrain``/``N_SAMPLES``, ``trial``, any
    hyperparameter or key a model, batch function or grab names). Runs on ``cuda:device_id`` if CUDA is
    available, else on the CPU. Returns ``(job, timekeys, train_losses, test_losses, *grabs)``, the grabs in
    the order of ``global_config['otherreturns']``: final values with ONLYTHRESHOLDS, else the train loss per
    step and the test loss per evaluation step (``EVAL_EVERY``). ``job_index`` and extra keyword arguments are
    accepted for the original's callers and do not change the job: its seeds come from SEED and its trial.
    Exceptions propagate, as in the original.
    """
    global_config = dict(global_config or {})
    bfn_config = dict(bfn_config or {})
    axes = dict(zip(list(iterator_names or []), job))
    known = set().union(*(signature_names(f) for f in consumers(global_config, bfn_config)))
    overrides = {axis_target(name, known): value for name, value in axes.items()}
    device = torch.device(f"cuda:{device_id}") if torch.cuda.is_available() else torch.device("cpu")
    rec = run_config({**global_config, **overrides}, bfn_config, device, axes)
    if rec.get("train_curve") is not None:
        train, test = rec["train_curve"], rec["test_curve"]
    else:
        train, test = rec["train_loss"], rec["test_loss"]
    grabs = [rec["grabs"][name] for name in (global_config.get("otherreturns") or {})]
    return (job, rec["timekeys"], train, test, *grabs)
