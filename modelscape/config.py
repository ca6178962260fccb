"""The one hyperparameter schema.

Every fact about a hyperparameter (name, type, default, help, aliases, whether it may be swept) lives in
``SCHEMA`` below. ``parse_args``/``base_args`` (backend/cli.py), config validation, the job identity and the
README table are all generated from it, so they cannot drift apart. How a sweep axis names a key
(``AXIS_ALIASES``, ``axis_target``) lives here too: the driver, the job and TensorBoard all read it.

This is the bottom of the house: it imports nothing from modelscape.
"""
from __future__ import annotations

import inspect
import json
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

__all__ = ["HP", "SCHEMA", "BY_NAME", "ALIASES", "SILENT_ALIASES", "RESERVED", "PARAMETERIZATIONS", "TRIAL",
           "AXIS_ALIASES", "ConfigError", "defaults", "canonicalize", "with_overrides", "coerce", "check_job_config",
           "axis_target", "close_matches", "signature_names", "parse_bool", "parse_int", "parse_range", "in_range",
           "load_json", "readme_table", "update_readme"]


@dataclass(frozen=True)
class HP:
    """One hyperparameter: ``type`` is the scalar type; ``is_list`` means the value is a list of ``type``;
    ``sweepable`` means the CLI accepts several values (the script then sweeps over them); ``range`` (numbers
    only) is the interval every value must lie in, written as in mathematics: ``"[1, inf)"``, ``"(0, 1]"``."""

    name: str
    type: type
    default: Any
    help: str
    is_list: bool = False
    sweepable: bool = False
    choices: tuple | None = None
    aliases: tuple = ()
    cli: bool = True
    group: str = "training"
    range: str | None = None
    item: Callable | None = None  # parses one value of a key whose values are not all of one type


CHECKPOINT_WORDS = ("thresholds", "final")


def checkpoint_item(v: Any):
    """One entry of CHECKPOINTS: a step number (an int >= 0; '500' and 5e2 read as 500), 'thresholds' or 'final'."""
    if isinstance(v, str) and v.strip().lower() in CHECKPOINT_WORDS:
        return v.strip().lower()
    if isinstance(v, bool):
        raise ValueError("a bool is not a step")
    try:
        step = parse_int(v)
    except (TypeError, ValueError):
        raise ValueError(f"give step numbers, {' or '.join(map(repr, CHECKPOINT_WORDS))}") from None
    if step < 0:
        raise ValueError("a step is >= 0")
    return step


PARAMETERIZATIONS = ("sp", "ntp", "mup", "mfp", "ntp-lr", "mup-lr")

SCHEMA: tuple[HP, ...] = (
    # --- the seed README's hyperparameters -----------------------------------------------------------
    HP("ONLINE", bool, True, "Fresh batch every step (True) or one fixed training set per trial (False)."),
    HP("N_SAMPLES", int, 1024, "Samples per step (ONLINE) or size of the fixed training set (offline).",
       sweepable=True, range="[1, inf)"),
    HP("N_TRAIN", int, 4000, "Size of the training pool a batch function may draw from (with N_TEST).",
       aliases=("N_TRIAN",), range="[1, inf)"),
    HP("N_TEST", int, 10_000, "Test-set size; the test set is drawn once per trial from the batch function "
       "unless X_te/y_te are given in the config.", range="[1, inf)"),
    HP("ONLYTHRESHOLDS", bool, True, "Record only final values (True) or loss curves and grabs along "
       "training (False)."),
    HP("NUM_TRIALS", int, 1, "Number of trials (independent seeds).", range="[1, inf)"),
    HP("MAX_ITER", int, 100_000, "Maximum number of gradient steps.", range="[1, inf)"),
    HP("LR", float, 1e-2, "Base learning rate (rescaled per layer by the parameterization and by GAMMA).",
       sweepable=True, range="[0, inf)"),
    HP("DEPTH", int, 2, "Number of hidden layers (> 0).", sweepable=True, aliases=("depth",), range="[1, inf)"),
    HP("WIDTH", int, 8192, "Width of the hidden layers.", sweepable=True, aliases=("width",), range="[1, inf)"),
    HP("GAMMA", float, 1.0, "Richness: outputs / gamma; SGD lr * gamma (gamma >= 1) or * gamma**2 (gamma < 1), "
       "Adam lr * 1 or * gamma (the same change of output and features per step).",
       sweepable=True, range="(0, inf)"),
    HP("DEVICES", int, [0], "GPU ids to spread jobs over (ignored without CUDA; then CPU cores are used).",
       is_list=True, group="execution", range="[0, inf)"),
    HP("SEED", int, 42, "Base seed; a job's seeds derive from SEED and its trial index only.", range="[0, inf)"),
    HP("LOSS_CHECKPOINTS", float, [0.15, 0.1], "Loss thresholds; a job stops once the EMA train loss is below "
       "all of them.", is_list=True, range="(-inf, inf)"),
    HP("EMA_SMOOTHER", float, 0.9, "EMA constant for the train loss: ema = s * ema + (1 - s) * loss.", range="[0, 1)"),
    HP("DETERMINISTIC", bool, True, "Seed every RNG from SEED and use torch's deterministic algorithms; False "
       "draws fresh seeds.", aliases=("DETERMINSITIC",)),
    HP("VERBOSE", bool, False, "Print the loss every step."),
    # --- what modelscape adds ------------------------------------------------------------------------
    HP("PARAMETERIZATION", str, "auto", "Layerwise parameterization; auto = mup, or sp when a post_init_fn "
       "is given (the hook parameterizes the model itself).", choices=("auto",) + PARAMETERIZATIONS,
       group="model"),
    HP("MODEL", str, "MLP", "Model: MLP, CNN, Transformer, GPT, or a class given in the config.", group="model"),
    HP("MODEL_FILE", str, None, "Python file holding the model class (with MODEL_NAME).", group="model"),
    HP("MODEL_NAME", str, None, "Name of the model class inside MODEL_FILE.", group="model"),
    HP("CENTER", bool, True, "Train f(x) - f0(x), with f0 a frozen copy of the initial model.", group="model"),
    HP("RELU_GAIN", bool, True, "Under muP-family parameterizations without BASE_WIDTH, multiply ReLU outputs by "
       "sqrt(2) (mupify's).", group="model"),
    HP("BASE_WIDTH", int, None, "muTransfer: the WIDTH at which the parameterization equals sp to the bit (the "
       "model's own init, no multipliers, the base LR); wider models scale from there by the rule, so values tuned "
       "at BASE_WIDTH carry over. None: mupify's absolute rules (see the README).", group="mup", range="[1, inf)"),
    HP("DEPTH_ALPHA", float, 0.0, "Depth transfer: multiply every residual branch by (L / BASE_DEPTH)^-DEPTH_ALPHA, L "
       "the number of residual blocks, with the matching LR (and, with EPS_SCALING, eps) of the parameters inside "
       "blocks; 0 off, 0.5 Depth-muP, 1 CompleteP. For GPT, Transformer and models that declare residual_branches.",
       sweepable=True, group="mup", range="[0, inf)"),
    HP("BASE_DEPTH", int, None, "Depth transfer: the number of residual blocks at which DEPTH_ALPHA changes nothing "
       "(values tuned there carry over to other depths). None: 1.", group="mup", range="[1, inf)"),
    HP("OUTPUT_MULT", float, 1.0, "Tunable multiplier of the read-out's output (on top of the parameterization's; "
       "LRs unchanged).", sweepable=True, group="mup", range="(0, inf)"),
    HP("ATTN_MULT", float, 1.0, "Tunable multiplier of the attention logits (on top of the parameterization's "
       "1/sqrt(d_head) or muP's 1/d_head); passed to a model whose constructor takes attn_mult.", sweepable=True,
       group="mup", range="(0, inf)"),
    HP("EMB_MULT", float, 1.0, "Tunable multiplier of the embeddings' and the input layer's output.", sweepable=True,
       group="mup", range="(0, inf)"),
    HP("EMB_LR_MULT", float, 1.0, "LR multiplier of the read-in weights (embeddings, input layer).", sweepable=True,
       group="mup", range="[0, inf)"),
    HP("HIDDEN_LR_MULT", float, 1.0, "LR multiplier of the hidden weights.", sweepable=True, group="mup",
       range="[0, inf)"),
    HP("READOUT_LR_MULT", float, 1.0, "LR multiplier of the read-out weights (and bottlenecks').", sweepable=True,
       group="mup", range="[0, inf)"),
    HP("VECTOR_LR_MULT", float, 1.0, "LR multiplier of the vector-like parameters (biases, norm gains and biases).",
       sweepable=True, group="mup", range="[0, inf)"),
    HP("READOUT_ZERO_INIT", bool, False, "Start the read-out's weight and bias at 0.", group="mup"),
    HP("QUERY_ZERO_INIT", bool, False, "Start the attention queries (SelfAttention.q) at 0.", group="mup"),
    HP("EPS_SCALING", bool, False, "Scale each parameter group's Adam eps with its gradient (by width, from "
       "BASE_WIDTH or width 1, and by 1/GAMMA), so eps stays negligible in wide or rich models.", group="mup"),
    HP("UPDATE_RULE", str, "auto", "muP's learning-rate rule: auto = from OPTIMIZER (an optimizer with no known "
       "rule is an error); sgd (mupify applied it to every optimizer) or adam (entrywise-normalised or sign-based "
       "steps) declare it.", choices=("auto", "sgd", "adam"), group="mup"),
    HP("OPTIMIZER", str, "SGD", "Optimizer: SGD, Adam, AdamW (any torch.optim name), or a class.",
       group="optimizer"),
    HP("MOMENTUM", float, 0.0, "SGD momentum.", group="optimizer", range="[0, inf)"),
    HP("WEIGHT_DECAY", float, 0.0, "Weight decay, divided by each parameter group's muP learning-rate factor "
       "so that lr x weight decay is the same at every width (as Microsoft's mup).", group="optimizer",
       range="[0, inf)"),
    HP("OPTIMIZER_KWARGS", dict, {}, "Extra optimizer keyword arguments (JSON on the command line).",
       group="optimizer"),
    HP("LOSS", str, "mse", "Loss: mse, cross_entropy (any torch.nn loss name), or a class/callable.",
       group="optimizer"),
    HP("RELATIVE_THRESHOLDS", bool, False, "LOSS_CHECKPOINTS are fractions of the initial loss.",
       group="training"),
    HP("EVAL_EVERY", int, 100, "Evaluate the test loss (and grabs, with ONLYTHRESHOLDS False) every N steps; "
       "0 = only at the end. The final test loss is always that of the final model.", group="training",
       range="[0, inf)"),
    HP("SYNC_EVERY", int, 0, "Read losses back from the device every N steps (0 = 1 on CPU, 16 on CUDA). "
       "Timekeys stay exact; a job may run up to N-1 steps past its last threshold.", group="training",
       range="[0, inf)"),
    HP("CUDA_GRAPHS", str, "auto", "On a CUDA device, record each job's training step as a CUDA graph after 3 eager "
       "steps and replay it (one launch per step instead of hundreds: small models stop waiting on Python); off: "
       "every step eager. A job that cannot be recorded (step hooks, checkpoints at steps, a batch that changes "
       "shape, an op that syncs with the CPU) steps eagerly, saying why in the log.", choices=("auto", "off"),
       group="execution"),
    HP("EXECUTOR", str, "auto", "Where jobs run: auto (= pool: each job in a worker process), inprocess "
       "(for debugging; unprotected from a job that crashes or hangs), ray (the extra ray: pip install -e '.[ray]') "
       "or slurm (the extra slurm: pip install -e '.[slurm]').", choices=("auto", "inprocess", "pool", "ray", "slurm"),
       group="execution"),
    HP("RAY_ADDRESS", str, None, "EXECUTOR=ray: the Ray cluster to join ('auto', or an address such as "
       "ray://head:10001); None starts a local Ray.", group="cluster"),
    HP("SLURM_PARTITION", str, None, "EXECUTOR=slurm: sbatch --partition.", group="cluster"),
    HP("SLURM_TIME", int, 60, "EXECUTOR=slurm: sbatch --time, in minutes, per array task.", group="cluster",
       range="[1, inf)"),
    HP("SLURM_GPUS_PER_NODE", int, 0, "EXECUTOR=slurm: sbatch --gpus-per-node for each array task (its jobs "
       "spread over them, WORKERS_PER_DEVICE per GPU).", group="cluster", range="[0, inf)"),
    HP("SLURM_CPUS_PER_TASK", int, 2, "EXECUTOR=slurm: sbatch --cpus-per-task.", group="cluster",
       range="[1, inf)"),
    HP("SLURM_MEM", str, None, "EXECUTOR=slurm: sbatch --mem, e.g. '32G'.", group="cluster"),
    HP("SLURM_ACCOUNT", str, None, "EXECUTOR=slurm: sbatch --account.", group="cluster"),
    HP("SLURM_QOS", str, None, "EXECUTOR=slurm: sbatch --qos.", group="cluster"),
    HP("SLURM_EXTRA", str, [], "EXECUTOR=slurm: extra sbatch lines, e.g. '--constraint=a100' (without "
       "'#SBATCH').", is_list=True, group="cluster"),
    HP("SLURM_SHARDS", int, 8, "EXECUTOR=slurm: array tasks the pending jobs are split into (fewer if fewer "
       "jobs); a fused group stays whole in one.", group="cluster", range="[1, inf)"),
    HP("SLURM_ARRAY_PARALLELISM", int, 64, "EXECUTOR=slurm: array tasks running at once.", group="cluster",
       range="[1, inf)"),
    HP("SLURM_LOG_DIR", str, None, "EXECUTOR=slurm: where submitit keeps its scripts and logs (default: "
       "RESULTS_DIR/EXPT_NAME/slurm).", group="cluster"),
    HP("DETACH", bool, False, "EXECUTOR=slurm: return once the array is submitted (follow it with "
       "`modelscape ls`) instead of waiting for it.", group="cluster"),
    HP("WORKERS_PER_DEVICE", int, 0, "Worker processes per GPU (or in all, without CUDA). 0 = auto: per GPU as many as "
       "its free memory (2 GiB each) and the CPU cores allow, at most 8 (small models leave a GPU idle one at a "
       "time); without CUDA, one per core.",
       group="execution", range="[0, inf)"),
    HP("THREADS", int, 0, "Torch threads per job; 0 = the idle cores (cores less the load average) divided "
       "among the jobs that run at once (1 each when a pool fills the cores).", group="execution",
       range="[0, inf)"),
    HP("JOB_TIMEOUT", float, None, "Seconds a job may run: past it, its worker process is killed and replaced and "
       "the job recorded as `timeout` (None: no limit; the pool only).", group="execution", range="(0, inf)"),
    HP("FUSE", str, "auto", "Train jobs that differ only in numbers (LR, GAMMA, trial, PARAMETERIZATION ...) of the "
       "built-in MLP together as one stacked model (auto), or each alone (off).", choices=("auto", "off"),
       group="execution"),
    HP("LIVE_EVERY", float, 1.0, "Seconds between a running job's progress reports to its driver (steps done; its "
       "curves so far every 5 periods), which drive the progress bar and are flushed to the store for `load()` and "
       "`modelscape watch`; 0 turns live progress off.", group="execution", range="[0, inf)"),
    HP("FUSE_MAX", int, 64, "Most jobs trained as one fused group (also capped by free GPU memory, and at 64 on "
       "a CPU).", group="execution", range="[1, inf)"),
    HP("RESULTS_DIR", str, "results", "Directory holding experiment stores.", group="results"),
    HP("CHECKPOINTS", str, [], "Save the model's weights at these step numbers (the model after that many "
       "updates), at `thresholds` (the model at each timekey) and/or at the `final` step, in RESULTS_DIR/"
       "EXPT_NAME/checkpoints (safetensors); `res.checkpoint(...)` loads them. Not part of a job's identity: a "
       "stored job that lacks a requested checkpoint is trained again.", is_list=True, group="results",
       item=checkpoint_item),
    HP("CHECKPOINT_OPTIMIZER", bool, False, "With CHECKPOINTS, also save the optimizer's state beside each "
       "checkpoint (so training can continue from it).", group="results"),
    HP("JOB_ID", str, "", "Set by the engine, not by users: the job's id in its store, which files its "
       "checkpoints, TensorBoard run and live progress ('' outside a sweep with a store).", cli=False,
       group="results"),
    HP("EXPT_NAME", str, "default", "Experiment name: the store is RESULTS_DIR/EXPT_NAME/results.db.",
       group="results"),
    HP("TENSORBOARD", bool, False, "Write each job as a TensorBoard run under RESULTS_DIR/EXPT_NAME/tensorboard: "
       "train and test loss, grabs, and its hyperparameters and final metrics for the HPARAMS tab (the extra tensorboard: "
       "pip install -e '.[tensorboard]'); open with `tensorboard --logdir RESULTS_DIR/EXPT_NAME`.", group="results"),
    HP("RESUME", bool, True, "Skip jobs already stored as done; False reruns everything.", group="results"),
    HP("RETRY_FAILED", bool, False, "On resume, also re-run the jobs stored as `crashed` (killed their worker "
       "twice) or `timeout`; `failed` jobs are always re-run.", group="results"),
    HP("CLAIM_TIMEOUT", float, 30.0, "Seconds without a heartbeat after which another driver on the same store "
       "takes over a driver's jobs (a dead driver on the same host is noticed at once).", group="results",
       range="(0, inf)"),
)

BY_NAME: dict[str, HP] = {hp.name: hp for hp in SCHEMA}
ALIASES: dict[str, str] = {a: hp.name for hp in SCHEMA for a in hp.aliases}
# The original modelscape's config keys: its scripts use these spellings on purpose, so they map without a
# warning, each to the key that does what it did there.
SILENT_ALIASES: dict[str, str] = {
    **dict.fromkeys(("MODEL_CLASS", "model_class"), "MODEL"),
    **dict.fromkeys(("OPTIMIZER_CLASS", "optimizer_class", "OPTIMIZER_FN", "optimizer_fn", "optimizer"), "OPTIMIZER"),
    **dict.fromkeys(("LOSS_CLASS", "loss_class", "LOSS_FN", "loss_fn", "loss"), "LOSS"),
    "momentum": "MOMENTUM", "weight_decay": "WEIGHT_DECAY", "model_file": "MODEL_FILE", "model_name": "MODEL_NAME",
    "POST_INIT_FN": "post_init_fn",
}

# Keys the package reads from a config that are not hyperparameters (callables, arrays): never "unknown".
# STORE_FILE is the engine's, set in each job: the store file, whose name keys the job's checkpoint folder.
RESERVED = frozenset({"otherreturns", "X_te", "y_te", "post_init_fn", "bfn_config", "trial", "step_hooks",
                      "STORE_FILE"})

# Axis names understood by name, as in the seed: the sample-size axis and the trial axis.
TRIAL = "trial"
AXIS_ALIASES = {"ntrain": "N_SAMPLES", "n_train": "N_SAMPLES", "bsz": "N_SAMPLES", "n_samples": "N_SAMPLES",
                "lr": "LR", "gamma": "GAMMA", "TRIAL": TRIAL, "trials": TRIAL, **ALIASES}


def defaults() -> dict:
    """A fresh dict of every hyperparameter's default (lists and dicts copied)."""
    return {hp.name: _copy(hp.default) for hp in SCHEMA}


def _copy(v):
    return list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v


class ConfigError(ValueError):
    """A config key or value that would make a sweep wrong; raised before anything runs."""


def _edit_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance: a transposition (WIDHT) costs one edit."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def close_matches(key: str, candidates: Iterable[str] | None = None) -> list[str]:
    """Schema names a misspelt ``key`` probably meant, best first (case-insensitive, edit distance)."""
    candidates = list(candidates if candidates is not None else list(BY_NAME) + list(ALIASES))
    up = key.upper()
    scored = []
    for c in candidates:
        cu = c.upper()
        if up == cu:
            scored.append((0, c))
            continue
        limit = 1 if len(up) <= 5 else 2
        dist = _edit_distance(up, cu)
        if dist <= limit:
            scored.append((dist, c))
        elif len(up) >= 6 and (cu.startswith(up) or up.startswith(cu)) and min(len(up), len(cu)) >= 6:
            scored.append((3, c))  # EMA_SMOOTH for EMA_SMOOTHER
    # an alias and its schema name (``width`` and ``WIDTH``) are one suggestion, not two
    return list(dict.fromkeys(ALIASES.get(c, c) for _, c in sorted(scored)))


def signature_names(fn: Callable | None) -> set[str]:
    """Parameter names that ``fn`` names explicitly (``**kwargs`` does not count)."""
    if fn is None:
        return set()
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return set()
    return {p.name for p in sig.parameters.values()
            if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}


def canonicalize(config: dict, consumers: Iterable[Callable] = (), where: str = "config",
                 extra_known: Iterable[str] = ()) -> dict:
    """Return a copy of ``config`` with aliases mapped to schema names, defaults filled in, values coerced.

    ``consumers`` are the callables that receive config keys (model class, base batch function, grabs): a key
    one of them names is user data. Raises ConfigError for a key close to a schema name and named by nothing,
    or for a bad value; warns once, listing them, for keys that are neither.
    """
    consumer_names = set(extra_known)
    for fn in consumers:
        consumer_names |= signature_names(fn)
    merged = {k: v for k, v in config.items() if k not in ALIASES and k not in SILENT_ALIASES}
    for key, value in config.items():
        name = ALIASES.get(key) or SILENT_ALIASES.get(key)
        if name is None:
            continue
        if key in ALIASES:
            warnings.warn(f"{where}: key {key!r} is read as {name!r}; please rename it", stacklevel=3)
        if name in merged and not _same(merged[name], value):
            # parse_args() / base_args() fill every canonical key with its default, so a default means "not set"
            if _is_default(name, value):
                continue
            if not _is_default(name, merged[name]):
                raise ConfigError(f"{where}: both {key!r} (read as {name}) and {name!r} are set, "
                                  f"to {value!r} and {merged[name]!r}; keep one")
        merged[name] = value
    out = defaults()
    unknown = []
    for key, value in merged.items():
        name = key
        if name in BY_NAME:
            out[name] = coerce(name, value)
        elif key in RESERVED or key in consumer_names:
            out[key] = value
        else:
            close = close_matches(key)
            if close:
                raise ConfigError(f"{where}: unknown key {key!r}; did you mean {close[0]!r}"
                                  + (f" (or {', '.join(map(repr, close[1:3]))})" if len(close) > 1 else "")
                                  + "? No model, batch function or grab names it either.")
            unknown.append(key)
            out[key] = value
    if unknown:
        warnings.warn(f"{where}: keys {sorted(unknown)} are not hyperparameters and no model, batch function "
                      "or grab names them; they are passed on to grabs' **kwargs as they are", stacklevel=3)
    return out


def with_overrides(config: dict, overrides: dict) -> dict:
    """A canonical ``config`` with ``overrides`` (canonical key names: a sweep's axis values) set, each schema
    key's value coerced as ``canonicalize`` would: equal to canonicalizing the merged dict, at a fraction of
    the cost for a sweep of many jobs."""
    return {**config, **{k: coerce(k, v) if k in BY_NAME else v for k, v in overrides.items()}}


def _is_default(name: str, value) -> bool:
    """Whether ``value`` is ``name``'s default as parse_args()/base_args() give it (a sweepable key's default
    comes as a one-value list)."""
    hp = BY_NAME.get(name)
    default = hp.default if hp is not None else None
    return _same(value, default) or (hp is not None and hp.sweepable and _same(value, [default]))


def _same(a, b) -> bool:
    """Equality that tolerates values (arrays, classes) whose ``==`` is not a plain bool."""
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return False


def coerce(name: str, value: Any) -> Any:
    """Check and convert one value against the schema; ConfigError names the key and the value."""
    hp = BY_NAME[name]
    if hp.type is str and not isinstance(value, str) and value is not None and hp.item is None:
        return value  # a class or callable given directly (MODEL, OPTIMIZER, LOSS)
    if hp.type is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a dict, got {value!r}")
        return dict(value)
    if hp.is_list:
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        return [_scalar(hp, v) for v in values]
    if hp.sweepable and isinstance(value, (list, tuple)):
        # parse_args()/base_args() give sweepable keys as lists; one value is that value, several are a sweep
        values = [_scalar(hp, v) for v in value]
        return values[0] if len(values) == 1 else values
    return _scalar(hp, value)


def parse_range(text: str) -> tuple[float, bool, float, bool]:
    """``"[1, inf)"`` -> ``(1.0, True, inf, False)``: low, low included, high, high included."""
    t = text.replace(" ", "")
    if len(t) < 5 or t[0] not in "[(" or t[-1] not in "])" or t[1:-1].count(",") != 1:
        raise ValueError(f"bad range {text!r}; write e.g. '[1, inf)' or '(0, 1]'")
    low, high = (float(x) for x in t[1:-1].split(","))
    return low, t[0] == "[", high, t[-1] == "]"


def in_range(hp: HP, v) -> bool:
    """Whether number ``v`` lies in ``hp.range`` (NaN never does; True for a key without a range)."""
    if hp.range is None:
        return True
    low, low_in, high, high_in = parse_range(hp.range)
    above = v >= low if low_in else v > low
    below = v <= high if high_in else v < high
    return bool(above and below)


def _scalar(hp: HP, v: Any) -> Any:
    try:
        if v is None and hp.default is None:
            return None
        if hp.item is not None:
            return hp.item(v)
        if hp.type is bool:
            return parse_bool(v)
        if hp.type in (int, float):
            if isinstance(v, bool):
                raise ValueError("a bool is not a number")
            v = parse_int(v) if hp.type is int else float(v)
            if not in_range(hp, v):
                raise ValueError(f"must be in {hp.range}")
            return v
        if hp.type is str:
            v = str(v)
            if hp.choices and v not in hp.choices:
                raise ValueError(f"choose one of {list(hp.choices)}")
            return v
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad value for {hp.name}: {v!r} ({e})") from None
    return v


def parse_bool(v: Any) -> bool:
    """True/False from a bool, 0/1, or the strings true/false/yes/no/1/0 (any case)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    s = str(v).strip().lower()
    if s in ("true", "t", "yes", "y", "1", "on"):
        return True
    if s in ("false", "f", "no", "n", "0", "off"):
        return False
    raise ValueError("expected true or false")


def parse_int(v: Any) -> int:
    """An int from an int, an integral float, or a string such as '1e5' or '10_000'."""
    if isinstance(v, bool):
        raise ValueError("a bool is not an integer")
    if isinstance(v, int):
        return v
    if hasattr(v, "__index__"):
        return int(v)
    f = float(str(v).replace("_", "")) if isinstance(v, str) else float(v)
    if not f.is_integer():
        raise ValueError("expected an integer")
    return int(f)


def check_job_config(cfg: dict) -> None:
    """Checks that need the whole resolved config of one job (scalars where a job needs scalars; each value's
    range is checked by ``coerce``, and again here for a config built by hand)."""
    for hp in SCHEMA:
        if hp.range is None or cfg.get(hp.name) is None:
            continue
        for v in cfg[hp.name] if isinstance(cfg[hp.name], list) else [cfg[hp.name]]:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not in_range(hp, v):
                raise ConfigError(f"bad value for {hp.name}: {v!r} (must be in {hp.range})")
    for name in (hp.name for hp in SCHEMA if hp.sweepable):
        if isinstance(cfg.get(name), list):
            raise ConfigError(f"{name} is a list ({cfg[name]!r}) in a single job's config; make it a sweep axis "
                              f"(iterators=[...{cfg[name]!r}...], iterator_names=[...'{name}'...])")
    if cfg.get("post_init_fn") is not None and cfg["PARAMETERIZATION"] not in ("auto", "sp"):
        raise ConfigError(f"post_init_fn ({getattr(cfg['post_init_fn'], '__qualname__', cfg['post_init_fn'])}) and "
                          f"PARAMETERIZATION={cfg['PARAMETERIZATION']!r} are both set: a hook that parameterizes the "
                          "model would be parameterized on top of. Leave PARAMETERIZATION unset (auto) or 'sp' to let "
                          "the hook do it, or drop the hook (call modelscape.mup.parameterize inside it if you need both)")
    if not cfg["LOSS_CHECKPOINTS"]:
        raise ConfigError("LOSS_CHECKPOINTS is empty; give at least one threshold")
    if cfg.get("DEPTH_ALPHA") and cfg.get("MODEL") in ("MLP", "CNN") and not cfg.get("MODEL_FILE"):
        raise ConfigError(f"DEPTH_ALPHA={cfg['DEPTH_ALPHA']} with MODEL={cfg['MODEL']!r}: DEPTH_ALPHA scales residual "
                          "branches, and an MLP or CNN has none; use MODEL='GPT' or 'Transformer', or a model whose "
                          "blocks declare residual_branches (see modelscape.mup.depth)")


def axis_target(name: str, known: set) -> str:
    """The config key a sweep axis writes: a schema name, ``trial``, an alias of one (``ntrain``, ``lr`` ...), or
    a user key some consumer names (``known``: the parameter names of the model, batch function and grabs)."""
    if name == TRIAL or name in BY_NAME:
        return name
    if name in AXIS_ALIASES:
        return AXIS_ALIASES[name]
    if name in known:
        return name
    close = close_matches(name)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown axis name {name!r}: it is not a hyperparameter, not 'trial', and no model class, "
                      f"batch function or grab has a parameter of that name{hint}")


def load_json(path):
    """The JSON file at ``path`` (``~`` expanded); FileNotFoundError naming the path if there is none."""
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"JSON file not found: {path}")
    with open(path) as f:
        return json.load(f)


def readme_table() -> str:
    """The hyperparameter table of the README, as markdown (the README embeds exactly this text)."""
    rows = ["| name | type | default | description |", "|---|---|---|---|"]
    for hp in SCHEMA:
        t = f"list[{hp.type.__name__}]" if hp.is_list else hp.type.__name__
        if hp.sweepable:
            t += " (sweepable)"
        extra = ""
        if hp.choices:
            extra += " One of " + ", ".join(f"`{c}`" for c in hp.choices) + "."
        if hp.range:
            extra += f" Range: `{hp.range}`."
        if hp.aliases:
            extra += " Also read from " + ", ".join(f"`{a}`" for a in hp.aliases) + " (with a warning)."
        rows.append(f"| `{hp.name}` | {t} | `{hp.default!r}` | {hp.help}{extra} |")
    return "\n".join(rows)


README_START = "<!-- hyperparameter table: generated by `python -m modelscape.config README.md` -->"
README_END = "<!-- end of hyperparameter table -->"


def update_readme(path: str) -> bool:
    """Rewrite the table between the README's markers from the schema; True if the file changed."""
    text = open(path).read()
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    new = text[:start] + "\n" + readme_table() + "\n" + text[end:]
    if new != text:
        with open(path, "w") as f:
            f.write(new)
    return new != text


if __name__ == "__main__":
    print("updated" if update_readme(sys.argv[1] if len(sys.argv) > 1 else "README.md") else "up to date")
