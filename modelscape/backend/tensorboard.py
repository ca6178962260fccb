"""TensorBoard runs of a sweep (TENSORBOARD=True): one run per job under RESULTS_DIR/EXPT_NAME/tensorboard.

Each job's ``TensorBoardObserver`` writes its run while it trains: the train loss (EMA and raw) per step, the
test loss at the evaluation steps and the grabs (numbers as scalars, arrays of numbers as histograms; strings and
complex numbers are not written); at the end, the hparams plugin's record: the job's hyperparameters
(``run_hparams``: its axis values, then the fixed ones in ``HPARAM_KEYS``) and its final metrics
(``final_metrics``). Before any job runs, the driver writes the experiment's summary (``start_sweep``): every
hparam with every value the sweep gives it and every metric, merged with what earlier sweeps into the same
folder wrote, so that the HPARAMS tab lists the same columns for every run.

Writing happens at flush points only (every ``FLUSH_SECS`` and at the end), in the job's own process, one file
per run written synchronously (no writer thread per job: a fused group of 64 jobs would start 64). Between
flush points, a read-back costs the observer a clock read (and, without curves, one appended pair).

tensorboard is an optional extra (``pip install -e '.[tensorboard]'`` in modelscape's folder), imported only when a job asks for it.
"""
from __future__ import annotations

import glob
import math
import numbers
import os
import re
import socket
import time
import uuid
import warnings

import numpy as np

from modelscape.backend.trainloop import LoopObserver, ema_thresholds
from modelscape.config import AXIS_ALIASES
from modelscape.utils import qualname, require

__all__ = ["require_tensorboard", "tensorboard_observers", "TensorBoardObserver", "logdir", "run_name",
           "run_hparams", "metric_tags", "final_metrics", "start_sweep", "write_experiment", "read_experiment"]

FLUSH_SECS = 5.0  # at most one write every this many seconds while a job trains (TensorBoard reloads every 5 s)
MAX_POINTS = 1000  # train-loss points per run: longer jobs write every k-th step (TensorBoard shows 1000)
MAX_NAME = 150  # characters of axis values in a run's name
# The hyperparameters every run lists besides its axes (those a config holds as numbers, strings or bools).
HPARAM_KEYS = ("WIDTH", "DEPTH", "LR", "GAMMA", "N_SAMPLES", "PARAMETERIZATION", "MODEL", "OPTIMIZER", "LOSS",
               "MOMENTUM", "WEIGHT_DECAY", "EMA_SMOOTHER", "MAX_ITER", "ONLINE", "SEED")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_EVENTS = "events.out.tfevents"


def require_tensorboard():
    """The ``tensorboard`` package, or a one-line ConfigError naming the extra that installs it."""
    return require("tensorboard", "tensorboard", needed_by="TENSORBOARD=True")


def tensorboard_observers(job) -> list:
    """``[TensorBoardObserver(job)]`` if the prepared job's config has TENSORBOARD=True, else ``[]``."""
    return [TensorBoardObserver(job)] if job.cfg.get("TENSORBOARD") else []


def logdir(cfg: dict) -> str:
    """Where a config's runs go: ``RESULTS_DIR/EXPT_NAME/tensorboard``, with a store or without one (in a sweep
    the engine sets RESULTS_DIR and EXPT_NAME to the store's folder, so ``main(store=PATH)`` puts them there)."""
    return os.path.join(cfg["RESULTS_DIR"], cfg["EXPT_NAME"], "tensorboard")


def run_name(axes: dict, job_id: str = "") -> str:
    """A job's run folder: its axis values and the start of its store id, ``LR=0.01,WIDTH=256,trial=0,id=3fa2b1c4``
    (characters other than letters, digits and ``._=,+-`` become ``_``). Without a store id (a plain
    ``run_config``, a sweep with ``store=False``) a fresh random one: each run gets its own folder."""
    name = _UNSAFE.sub("_", ",".join(f"{k}={_plain(v)}" for k, v in axes.items()))[:MAX_NAME]
    tag = f"id={(job_id or uuid.uuid4().hex)[:8]}"
    return f"{name},{tag}" if name else tag


def run_hparams(cfg: dict, axes: dict) -> dict:
    """The hparams of a job's run: its axis values (under the axis names), then each key of ``HPARAM_KEYS`` no
    axis sets. Numbers, strings and bools; a class or function by its qualified name; anything else as text."""
    set_by_axes = {AXIS_ALIASES.get(a, a) for a in axes}
    pairs = list(axes.items()) + [(k, cfg.get(k)) for k in HPARAM_KEYS if k not in set_by_axes]
    return {k: _hparam_value(v) for k, v in pairs if v is not None}


def metric_tags(thresholds) -> list[str]:
    """The hparams table's metrics: final losses, steps, one timekey per threshold, the status as 0/1."""
    return (["final/train_loss", "final/test_loss", "final/steps"]
            + [f"timekey/{float(t)!r}" for t in thresholds] + ["status/done", "status/diverged"])


def final_metrics(record: dict, thresholds) -> dict:
    """``{metric tag: value}`` of a job's record; ``thresholds`` are the config's LOSS_CHECKPOINTS (its
    timekeys' order). A NaN (a threshold never reached, no test set) is left out: a blank cell in the table."""
    values = [record["train_loss"], record["test_loss"], record["steps"], *record["timekeys"],
              record["status"] == "done", record["status"] == "diverged"]
    return {tag: float(v) for tag, v in zip(metric_tags(thresholds), values) if math.isfinite(float(v))}


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


def _hparam_value(v):
    v = _plain(v)
    if isinstance(v, (bool, str)):
        return v
    if isinstance(v, numbers.Real):
        return float(v)
    if callable(v):
        return qualname(v)
    return str(v)


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------

class _RunWriter:
    """One event file in ``directory``, written synchronously; its events are read by any TensorBoard reader."""

    def __init__(self, directory: str, replace: bool = False):
        from tensorboard.compat.proto import event_pb2, summary_pb2  # optional extra
        from tensorboard.summary.writer.record_writer import RecordWriter  # optional extra
        self.Event, self.Summary = event_pb2.Event, summary_pb2.Summary
        os.makedirs(directory, exist_ok=True)
        if replace:  # a job run again (a failed one retried, RESUME=False): its old curves are stale
            for old in glob.glob(os.path.join(directory, _EVENTS + ".*")):
                os.remove(old)
        name = f"{_EVENTS}.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.path = os.path.join(directory, name)
        self.records = RecordWriter(open(self.path, "wb"))
        self.records.write(self.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())

    def scalars(self, step: int, values: dict) -> None:
        """One event at ``step`` holding a scalar per tag."""
        summary = self.Summary(value=[self.Summary.Value(tag=t, simple_value=v) for t, v in values.items()])
        self.summary(step, summary)

    def summary(self, step: int, summary) -> None:
        self.records.write(self.Event(wall_time=time.time(), step=int(step), summary=summary).SerializeToString())

    def flush(self) -> None:
        self.records.flush()

    def close(self) -> None:
        self.records.close()


def _hparams_summary(tag: str, **plugin_data):
    """A Summary holding the hparams plugin's ``HParamsPluginData(**plugin_data)`` under ``tag``."""
    from tensorboard.compat.proto import summary_pb2  # optional extra
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2  # optional extra
    data = plugin_data_pb2.HParamsPluginData(**plugin_data)
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag=tag, metadata=metadata.create_summary_metadata(data))])


def _proto_value(v):
    from google.protobuf import struct_pb2  # optional extra
    if isinstance(v, bool):
        return struct_pb2.Value(bool_value=v)
    if isinstance(v, str):
        return struct_pb2.Value(string_value=v)
    return struct_pb2.Value(number_value=v)


class TensorBoardObserver(LoopObserver):
    """Writes one job's TensorBoard run (see the module's docstring); ``directory`` is the run's folder.

    With curves (ONLYTHRESHOLDS=False) the train loss is written per step (``train/loss_ema``, ``train/loss``),
    every k-th step past ``MAX_POINTS`` steps; without curves only the EMA is known, sampled at the read-backs
    (every SYNC_EVERY steps) and at the end. Test loss (``test/loss``) and grabs (``grab/<name>``) at the
    evaluation steps, or at the end without curves. The run opens at the first read-back, so a running job
    shows at once, in the HPARAMS tab too (its metrics come at the end). Optional: should writing fail (a full
    disk), the run stops where it is and the job trains on (``LoopObserver``).
    """

    optional = True

    def __init__(self, job):
        require_tensorboard()
        cfg = job.cfg
        self.directory = os.path.join(logdir(cfg), run_name(job.axes, cfg["JOB_ID"]))
        self.replace = bool(cfg["JOB_ID"])
        self.hparams = run_hparams(cfg, job.axes)
        self.thresholds = list(cfg["LOSS_CHECKPOINTS"])
        self.smoother = cfg["EMA_SMOOTHER"]
        self.stride = max(1, -(-int(cfg["MAX_ITER"]) // MAX_POINTS))
        self.writer: _RunWriter | None = None
        self.next_flush = 0.0  # the first read-back opens the run
        self.n_raw = 0  # per-step train losses written (with curves)
        self.ema = None  # the EMA at step n_raw - 1
        self.n_eval = 0  # evaluations written
        self.ema_points: list = []  # without curves: (step, EMA) at read-backs, not yet written
        self.next_point = 0
        self.role = f"TensorBoard (writing {self.directory})"

    def failed(self, exc):
        if self.writer is not None:
            self.writer.close()

    # -- the loop's calls ------------------------------------------------------------------------------

    def after_sync(self, step, tracker, evals):
        if tracker.raw is None and step - 1 >= self.next_point:  # no per-step losses are kept: sample the EMA
            self.ema_points.append((step - 1, float(tracker.ema)))
            self.next_point = step - 1 + self.stride
        if time.monotonic() >= self.next_flush:
            self._write_train(tracker.raw)
            self._write_evals(evals.eval_steps, evals.test_curve, evals.grab_trace)
            self.writer.flush()
            self.next_flush = time.monotonic() + FLUSH_SECS

    def at_end(self, record, model, opt):
        steps = record["steps"]
        if "train_curve" in record:
            self._write_train(record["train_raw"], record["train_curve"], last=steps - 1)
            self._write_evals(record["eval_steps"], record["test_curve"], record["grabs"])
        else:
            if not self.ema_points or self.ema_points[-1][0] != steps - 1:
                self.ema_points.append((steps - 1, record["train_loss"]))
            self._write_train(None)
            self._write_evals([steps], [record["test_loss"]], {k: [v] for k, v in record["grabs"].items()})
        self.writer.scalars(steps, final_metrics(record, self.thresholds))
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2  # optional extra
        status = api_pb2.STATUS_FAILURE if record["status"] == "diverged" else api_pb2.STATUS_SUCCESS
        end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
        self.writer.summary(steps, _hparams_summary(metadata.SESSION_END_INFO_TAG, session_end_info=end))
        self.writer.close()

    # -- writing ----------------------------------------------------------------------------------------

    def _open(self) -> _RunWriter:
        if self.writer is None:
            from tensorboard.plugins.hparams import metadata, plugin_data_pb2  # optional extra
            self.writer = _RunWriter(self.directory, replace=self.replace)
            start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
            for k, v in self.hparams.items():
                start.hparams[k].CopyFrom(_proto_value(v))
            self.writer.summary(0, _hparams_summary(metadata.SESSION_START_INFO_TAG, session_start_info=start))
        return self.writer

    def _write_train(self, raw, ema=None, last: int | None = None) -> None:
        """The train losses not yet written: ``raw`` per step (``ema`` its EMA, computed here if None), or
        without curves (``raw`` None) the sampled EMA points. ``last``: the job's last step, always written."""
        w = self._open()
        if raw is None:
            for step, value in self.ema_points:
                w.scalars(step, {"train/loss_ema": value})
            self.ema_points.clear()
            return
        new = np.asarray(raw[self.n_raw:], dtype=np.float64)
        if not len(new):
            return
        # the record's own EMA recurrence, continued from the last step written: the same numbers
        ema = ema_thresholds(new, (), self.smoother, self.ema)[0] if ema is None else ema[self.n_raw:]
        for k in range(len(new)):
            step = self.n_raw + k
            if step % self.stride == 0 or step == last:
                w.scalars(step, {"train/loss_ema": ema[k], "train/loss": new[k]})
        self.n_raw += len(new)
        self.ema = ema[-1]

    def _write_evals(self, eval_steps, test_curve, grabs: dict) -> None:
        """The evaluations from the ``n_eval``-th on: ``test_curve[k]`` and each ``grabs[name][k]`` at step
        ``eval_steps[k]``."""
        w = self._open()
        for k in range(self.n_eval, len(eval_steps)):
            step = int(eval_steps[k])
            values = {"test/loss": float(test_curve[k])}
            for name, trace in grabs.items():
                v = np.asarray(trace[k])
                if v.ndim == 0 and v.dtype.kind in "biuf":
                    values[f"grab/{name}"] = float(v)
                elif v.ndim and v.dtype.kind in "biuf":
                    self._histogram(step, f"grab/{name}", v)
            w.scalars(step, values)
        self.n_eval = max(self.n_eval, len(eval_steps))

    def _histogram(self, step, tag, values) -> None:
        from torch.utils.tensorboard.summary import histogram  # optional extra
        finite = values[np.isfinite(values)].astype(np.float64)
        if finite.size:
            self.writer.summary(step, histogram(tag, finite, bins="auto"))


# --------------------------------------------------------------------------------------------------------
# The experiment's summary (driver side)
# --------------------------------------------------------------------------------------------------------

def start_sweep(jobs) -> None:
    """Driver side, before any job runs, for the sweep's jobs (``(axes, overrides, config)``) that have
    TENSORBOARD=True: a ConfigError naming the extra if tensorboard is not installed; then each experiment
    folder's summary, written to the root of its ``logdir``."""
    wanted = [(axes, cfg) for axes, _, cfg in jobs if cfg.get("TENSORBOARD")]
    if not wanted:
        return
    require_tensorboard()
    by_dir: dict = {}
    for axes, cfg in wanted:
        hparams, thresholds = by_dir.setdefault(logdir(cfg), ([], []))
        hparams.append(run_hparams(cfg, axes))
        thresholds += [t for t in cfg["LOSS_CHECKPOINTS"] if t not in thresholds]
    for directory, (hparams, thresholds) in by_dir.items():
        try:
            write_experiment(directory, hparams, thresholds)
        except OSError as e:  # a full disk, say: the jobs' own runs (and results) need no summary
            warnings.warn(f"TensorBoard: cannot write the experiment's summary in {directory} ({e}); the HPARAMS "
                          "tab will lack its columns, the runs and the results are kept", RuntimeWarning, stacklevel=2)


def write_experiment(directory: str, runs: list, thresholds) -> None:
    """Write the hparams plugin's experiment summary to ``directory`` (a logdir's root): one column per hparam
    of ``runs`` (their ``run_hparams``), with every value they take as its domain, and the metrics of
    ``metric_tags(thresholds)``; merged with the summary already there (an earlier sweep), which it replaces."""
    from tensorboard.plugins.hparams import api_pb2, metadata  # optional extra
    values: dict = {}  # hparam name -> its distinct values, in first-seen order
    for hp in runs:
        for k, v in hp.items():
            _add(values.setdefault(k, []), v)
    metrics = metric_tags(thresholds)
    old = read_experiment(directory)
    if old is not None:
        for info in old.hparam_infos:
            for v in _domain_values(info):
                _add(values.setdefault(info.name, []), v)
        metrics += [m.name.tag for m in old.metric_infos if m.name.tag not in metrics]
    infos = [_hparam_info(name, vals) for name, vals in values.items()]
    experiment = api_pb2.Experiment(hparam_infos=infos, time_created_secs=time.time(),
                                    metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t))
                                                  for t in metrics])
    for path in glob.glob(os.path.join(directory, _EVENTS + ".*")):
        os.remove(path)
    writer = _RunWriter(directory)
    writer.summary(0, _hparams_summary(metadata.EXPERIMENT_TAG, experiment=experiment))
    writer.close()


def read_experiment(directory: str):
    """The hparams experiment summary in ``directory``'s own event files (not its runs'), or None."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # optional extra
    from tensorboard.plugins.hparams import metadata  # optional extra
    for path in sorted(glob.glob(os.path.join(directory, _EVENTS + ".*"))):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.tag == metadata.EXPERIMENT_TAG:
                    return metadata.parse_experiment_plugin_data(value.metadata.plugin_data.content)
    return None


def _add(values: list, v) -> None:
    if not any(type(u) is type(v) and u == v for u in values):  # True and 1.0 stay apart
        values.append(v)


def _domain_values(info) -> list:
    out = []
    for v in info.domain_discrete.values:
        kind = v.WhichOneof("kind")
        out.append(v.bool_value if kind == "bool_value" else v.string_value if kind == "string_value"
                   else v.number_value)
    return out


def _hparam_info(name: str, vals: list):
    """An HParamInfo whose discrete domain is ``vals``: numbers (sorted), bools, or else all as strings."""
    from google.protobuf import struct_pb2  # optional extra
    from tensorboard.plugins.hparams import api_pb2  # optional extra
    if all(isinstance(v, bool) for v in vals):
        kind = api_pb2.DATA_TYPE_BOOL
    elif all(isinstance(v, float) for v in vals):
        kind, vals = api_pb2.DATA_TYPE_FLOAT64, sorted(vals)
    else:
        kind, vals = api_pb2.DATA_TYPE_STRING, list(dict.fromkeys(str(v) for v in vals))
    return api_pb2.HParamInfo(name=name, type=kind, differs=len(vals) > 1,
                              domain_discrete=struct_pb2.ListValue(values=[_proto_value(v) for v in vals]))
