"""Live progress, the job's side: what a running job tells its driver while it trains.

In the process that trains a job (a pool worker, or the driver itself in-process), ``LiveObserver`` watches the
step loop and, every LIVE_EVERY seconds, sends a message to this process's *sink*: the job's key (its JOB_ID,
or its axis values without a store), the steps done, and every CURVE_PERIODS periods the new part of its curves
(EMA and raw train loss per step, test-loss points and scalar grabs recorded so far: nothing the job does not
compute anyway). The runner sets the sink around each unit of work (``reporting``): a pool worker ships the
messages over its pipe, the in-process executor hands them to the driver directly. With no sink (a plain
``run_config``) or LIVE_EVERY=0 no observer is made at all.

The worker's ``sys.stdout`` and ``sys.stderr`` are replaced by ``capture_output`` with writers that send whole
lines, prefixed with the running job's axis values (``[WIDTH=256 LR=0.01 trial=0]``), to the driver, which
prints them above its progress bar. What the driver makes of all this is ``board``.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import time

import numpy as np

from modelscape.backend.trainloop import LoopObserver, ema_thresholds
from modelscape.results import axis_label

__all__ = ["reporting", "set_label", "axes_label", "job_key", "live_observers", "LiveObserver", "LineWriter",
           "capture_output", "real_stream", "CURVE_PERIODS"]

CURVE_PERIODS = 5  # a job's curves travel every this many LIVE_EVERY periods; its step count every period

_sink = None  # where this process's observers send their messages: set by the worker around a unit of work
_label = ""  # the axis values of the job running now in this process, prefixed to its output lines


@contextlib.contextmanager
def reporting(sink, label: str = ""):
    """Within this block, jobs prepared in this process report to ``sink(message)`` (None: they do not), and
    their output lines are prefixed with ``label``."""
    global _sink, _label
    old = _sink, _label
    _sink, _label = sink, label
    try:
        yield
    finally:
        _sink, _label = old


def set_label(label: str) -> None:
    """The prefix of this process's output lines from now on (the fused trainer sets each member's in turn)."""
    global _label
    _label = label


def axes_label(axes) -> str:
    """``[WIDTH=256 LR=0.01 trial=0]``: a job's axis values as a prefix of its output lines ('' without axes)."""
    if not axes:
        return ""
    return "[" + " ".join(f"{k}={_short(v)}" for k, v in axes.items()) + "]"


def _short(v) -> str:
    v = axis_label(v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def job_key(job_id, axes) -> str:
    """The key a job's messages carry: its store id, or (a sweep without a store) its axis values."""
    return job_id or "axes:" + json.dumps({str(k): axis_label(v) for k, v in (axes or {}).items()}, sort_keys=True)


def live_observers(job) -> list:
    """``[LiveObserver]`` for a prepared job, or [] when nothing listens in this process or LIVE_EVERY is 0."""
    every = job.cfg.get("LIVE_EVERY", 0)
    if _sink is None or not every:
        return []
    return [LiveObserver(_sink, job_key(job.cfg.get("JOB_ID"), job.axes), every, job.t0)]


class LiveObserver(LoopObserver):
    """Sends a job's progress to ``sink`` at most every ``every`` seconds, its new curve points every
    ``CURVE_PERIODS`` reports. When no report is due, ``after_sync`` costs one clock read and a compare.
    Optional: should sending fail, the job trains on without it (``LoopObserver``)."""

    optional = True
    role = "live progress"

    def __init__(self, sink, key: str, every: float, t0: float):
        self.sink, self.key, self.every, self.t0 = sink, key, float(every), t0
        self._due = 0.0  # the first sync reports: the driver learns at once that the job runs
        self._curves_due = 0.0
        self._raw_sent = 0  # train losses already sent
        self._ema = None  # the EMA at the last loss sent
        self._evals_sent = 0  # test-loss points already sent

    def after_sync(self, step, tracker, evals):
        if time.monotonic() < self._due:
            return
        now = time.monotonic()
        self._due = now + self.every
        msg = {"key": self.key, "steps": step, "wall_time": time.perf_counter() - self.t0,
               "train_loss": float(tracker.ema) if tracker.ema is not None else math.nan,
               "test_loss": float(evals.test_curve[-1]) if evals.test_curve else math.nan,
               "thresholds": np.array(tracker.thresholds), "timekeys": np.array(tracker.crossed)}
        if now >= self._curves_due:
            self._curves_due = now + self.every * CURVE_PERIODS
            msg.update(self._new_points(tracker, evals))
        self.sink(msg)

    def at_end(self, record, model, opt):
        # A fused member's record reaches the driver with its whole group's: until then, this says it ended.
        self.sink({"key": self.key, "steps": record["steps"], "wall_time": time.perf_counter() - self.t0,
                   "train_loss": record["train_loss"], "test_loss": record["test_loss"],
                   "thresholds": np.array(record["thresholds"]), "timekeys": np.array(record["timekeys"]),
                   "ended": record["status"]})

    def _new_points(self, tracker, evals) -> dict:
        """The curve points recorded since the last message."""
        out = {}
        if tracker.raw is not None:
            raw = np.asarray(tracker.raw[self._raw_sent:], dtype=np.float64)
            # the same recurrence, from the same last value, as the final record's train_curve
            ema = ema_thresholds(raw, (), tracker.smoother, self._ema)[0]
            if len(raw):
                self._raw_sent += len(raw)
                self._ema = ema[-1]
            out.update(train_raw=raw, train_curve=ema)
        if evals.curves:
            n = self._evals_sent
            self._evals_sent = len(evals.eval_steps)
            out.update(eval_steps=np.asarray(evals.eval_steps[n:], dtype=np.int64),
                       test_curve=np.asarray(evals.test_curve[n:], dtype=np.float64),
                       grabs={name: np.asarray(vals[n:]) for name, vals in evals.grab_trace.items()
                              if all(np.ndim(v) == 0 for v in vals[n:])})  # scalars: arrays can be large
        return out


class LineWriter(io.TextIOBase):
    """A text stream that sends each whole line written to it, prefixed with the running job's label, to
    ``send(stream_name, text)``; it falls back to ``original`` if sending fails (the driver is gone)."""

    def __init__(self, name: str, send, original):
        super().__init__()
        self.name, self.send, self.original = name, send, original
        self._partial = ""

    def writable(self):
        return True

    def write(self, s) -> int:
        text = self._partial + s
        cut = text.rfind("\n") + 1
        self._partial = text[cut:]
        if cut:
            self._ship(text[:cut])
        return len(s)

    def flush(self):
        if self._partial:  # a line without its end (print(..., end="")): sent as it is, kept whole
            text, self._partial = self._partial + "\n", ""
            self._ship(text)

    def _ship(self, text):
        if _label:
            text = "".join(f"{_label} {line}" for line in text.splitlines(keepends=True))
        try:
            self.send(self.name, text)
        except Exception:
            self.original.write(text)

    def fileno(self):
        return self.original.fileno()

    def isatty(self):
        return False

    @property
    def encoding(self):
        return getattr(self.original, "encoding", "utf-8")


@contextlib.contextmanager
def capture_output(send):
    """Within this block ``sys.stdout`` and ``sys.stderr`` send their lines to ``send(stream_name, text)``
    (see ``LineWriter``); ``send`` None leaves them alone."""
    if send is None:
        yield
        return
    old = sys.stdout, sys.stderr
    sys.stdout = LineWriter("stdout", send, old[0])
    sys.stderr = LineWriter("stderr", send, old[1])
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = old


def real_stream(stream):
    """The stream under any ``LineWriter`` (the driver prints a job's lines there, never back into one)."""
    while isinstance(stream, LineWriter):
        stream = stream.original
    return stream
