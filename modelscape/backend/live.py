"""Live progress: what a running job tells its driver, and what the driver makes of it.

In the process that trains a job (a pool worker, or the driver itself in-process), ``LiveObserver`` watches the
step loop and, every LIVE_EVERY seconds, sends a message to this process's *sink*: the job's key (its JOB_ID,
or its axis values without a store), the steps done, and every CURVE_PERIODS periods the new part of its curves
(EMA and raw train loss per step, test-loss points and scalar grabs recorded so far: nothing the job does not
compute anyway). The worker sets the sink around each unit of work (``reporting``): a pool worker ships the
messages over its pipe, the in-process executor hands them to the driver directly. With no sink (a plain
``run_config``) or LIVE_EVERY=0 no observer is made at all.

The worker's ``sys.stdout`` and ``sys.stderr`` are replaced by ``capture_output`` with writers that send whole
lines, prefixed with the running job's axis values (``[WIDTH=256 LR=0.01 trial=0]``), to the driver, which
prints them above its progress bar.

On the driver, ``LiveBoard`` keeps the partial state of the running jobs, draws the progress bar (counted in
training steps across jobs) and flushes the running jobs' partial records to the store every few seconds, so
``modelscape.load()``, ``modelscape show`` and ``modelscape watch`` see them from other processes.
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
from modelscape.results import NO_RESULT, axis_label

CURVE_PERIODS = 5  # a job's curves travel every this many LIVE_EVERY periods; its step count every period
FLUSH_PERIODS = 2  # the driver writes the running jobs' partial records to the store every this many periods
BAR_INTERVAL = 0.25  # seconds between redraws of the progress bar (at most)
RATE_WINDOW = 30.0  # seconds of history the bar's step rate (and so its ETA) is measured over

_sink = None  # where this process's observers send their messages: set by the worker around a unit of work
_label = ""  # the axis values of the job running now in this process, prefixed to its output lines


# --- the worker's side ----------------------------------------------------------------------------------

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
    ``CURVE_PERIODS`` reports. When no report is due, ``after_sync`` costs one clock read and a compare."""

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


def _real(stream):
    """The stream under any ``LineWriter`` (the driver prints a job's lines there, never back into one)."""
    while isinstance(stream, LineWriter):
        stream = stream.original
    return stream


# --- the driver's side ----------------------------------------------------------------------------------

def steps_done(max_iter: dict, reported: dict, finished) -> int:
    """Training steps done across a sweep's jobs: all of a finished job's MAX_ITER (one that stopped early at
    its thresholds, failed or diverged has nothing left to do), and the steps a running job last reported (at
    most its MAX_ITER). ``max_iter``: {job: MAX_ITER}; ``reported``: {job: steps}; ``finished``: a set of jobs."""
    return (sum(max_iter[i] for i in finished)
            + sum(min(s, max_iter[i]) for i, s in reported.items() if i not in finished))


def step_rate(history, window: float = RATE_WINDOW) -> float:
    """Training steps per second over the last ``window`` seconds of ``history`` (``(time, steps trained)`` in
    time order); NaN until two points lie apart. Steps a job was credited by stopping early are not in
    ``steps trained``: they would make the rate, and so the ETA, jump whenever a job reaches its thresholds."""
    if len(history) < 2:
        return math.nan
    t1, n1 = history[-1]
    t0, n0 = next(((t, n) for t, n in history if t >= t1 - window), history[0])
    if t1 - t0 <= 0:
        t0, n0 = history[0]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else math.nan


def eta_seconds(total: int, position: int, rate: float) -> float:
    """Seconds left at ``rate`` steps per second for the ``total - position`` steps not yet done (an upper
    bound: jobs that reach their thresholds early skip the rest of their steps); NaN without a rate."""
    left = max(0, total - position)
    if left == 0:
        return 0.0
    return left / rate if rate > 0 else math.nan


def state_counts(n_jobs: int, running: int, finished_statuses) -> dict:
    """``{running, queued, done, failed}`` of a sweep of ``n_jobs``: ``finished_statuses`` lists each
    finished job's status (failed, crashed and timeout count as failed)."""
    failed = sum(s in NO_RESULT for s in finished_statuses)
    done = len(finished_statuses) - failed
    return {"running": running, "queued": n_jobs - running - done - failed, "done": done, "failed": failed}


class _Partial:
    """What the driver knows of one running job: its last report and its curves so far."""

    def __init__(self, max_iter: int, started: float):
        self.max_iter, self.started = max_iter, started
        self.steps, self.wall_time, self.train_loss, self.test_loss = 0, 0.0, math.nan, math.nan
        self.parts: dict = {}  # curve name -> list of arrays received
        self.grabs: dict = {}  # grab name -> list of arrays received
        self.last: dict = {}  # thresholds, timekeys
        self.ended: str | None = None  # its final status, once it ended (its record may still be on its way)

    def add(self, msg: dict) -> None:
        self.ended = msg.get("ended", self.ended)
        self.steps, self.wall_time = msg["steps"], msg["wall_time"]
        self.train_loss, self.test_loss = msg["train_loss"], msg.get("test_loss", math.nan)
        for name in ("train_curve", "train_raw", "eval_steps", "test_curve"):
            if name in msg:
                self.parts.setdefault(name, []).append(msg[name])
        for name, vals in msg.get("grabs", {}).items():
            self.grabs.setdefault(name, []).append(vals)
        for name in ("thresholds", "timekeys"):
            if name in msg:
                self.last[name] = msg[name]

    def record(self, job_id, axes) -> dict:
        """The job's partial record (status ``running``), shaped as a finished one."""
        rec = {"job_id": job_id, "status": "running", "axes": axes, "steps": int(self.steps),
               "max_iter": int(self.max_iter), "wall_time": float(self.wall_time),
               "train_loss": float(self.train_loss), "test_loss": float(self.test_loss),
               "thresholds": self.last.get("thresholds"), "timekeys": self.last.get("timekeys"),
               **({"ended": self.ended} if self.ended else {}),
               **{name: _joined(parts) for name, parts in self.parts.items()},
               "grabs": {name: _joined(parts) for name, parts in self.grabs.items()}}
        return rec


def _joined(parts: list) -> np.ndarray:
    """The arrays of ``parts`` as one, which then replaces them (the next flush joins only what came since)."""
    if len(parts) > 1:
        parts[:] = [np.concatenate(parts)]
    return parts[0]


class LiveBoard:
    """The driver's view of a sweep while it runs: progress messages in, a progress bar and the store's live
    rows out.

    ``jobs``/``ids``/``todo`` as in ``job_iterator.run_jobs``; ``st`` the store this driver writes (None: keep
    nothing); ``every``: LIVE_EVERY; ``bar``: draw a progress bar on stderr; ``stored``: the statuses of the
    jobs not in ``todo`` (stored before the sweep started). The bar counts training steps: its total is the sum
    of every job's MAX_ITER (the stored jobs count as done).
    """

    def __init__(self, jobs, ids, todo, st=None, every: float = 1.0, bar: bool = False, stored=()):
        todo = list(todo)
        self.jobs, self.ids, self.st = jobs, ids, st
        self.every = float(every)
        self.index = {job_key(ids[i], jobs[i][0]): i for i in todo}
        self.max_iter = {i: int(cfg["MAX_ITER"]) for i, (_, _, cfg) in enumerate(jobs)}
        self.finished = set(range(len(jobs))) - set(todo)  # stored before this sweep started
        self.statuses = list(stored) or ["done"] * len(self.finished)  # their statuses, if known
        self.running: dict[int, _Partial] = {}
        self.trained_finished = 0  # steps the jobs finished in this sweep actually trained
        self.history: list = []  # (monotonic time, steps trained in this sweep), for the rate
        self.dirty: set = set()
        self._next_flush = 0.0
        self._next_draw = 0.0
        self.bar = self._make_bar() if bar else None

    def _make_bar(self):
        from tqdm import tqdm  # plain text: tqdm.auto needs ipywidgets in a notebook
        total = sum(self.max_iter.values())
        start = steps_done(self.max_iter, {}, self.finished)
        # k and M in the rate, and in the counts only where they are long ("0.00/160 steps" reads badly).
        # miniters=1: tqdm's own adaptive minimum (raised by a burst of finished jobs) would hold back the
        # small steps of a slow job for many seconds; _draw throttles instead.
        counts = "{n_fmt}/{total_fmt}" if total >= 1_000_000 else "{n}/{total}"
        board = self

        class StepBar(tqdm):
            # tqdm's own rate counts every step the bar moves, including those a job is credited when it stops
            # early: the board's rate and ETA count trained steps only (step_rate, eta_seconds).
            @property
            def format_dict(self):
                d = super().format_dict
                rate = board.rate()
                eta = eta_seconds(d["total"], d["n"], rate)
                d["eta"] = "?" if math.isnan(eta) else tqdm.format_interval(eta)
                d["steps_rate"] = "?" if math.isnan(rate) else tqdm.format_sizeof(rate) + "/s"
                return d

        return StepBar(total=total, initial=start, unit="", unit_scale=True, dynamic_ncols=True, miniters=1,
                       mininterval=BAR_INTERVAL, postfix=self._postfix(),
                       bar_format="{percentage:3.0f}%|{bar}| " + counts + " steps "
                       "[{elapsed}<{eta}, {steps_rate}{postfix}]")

    def trained(self) -> int:
        """Steps trained so far in this sweep: the finished jobs' steps and the running jobs' last reports."""
        return self.trained_finished + sum(p.steps for p in self.running.values())

    def position(self) -> int:
        """Where the bar stands (``steps_done``): a job that ended counts whole, its record stored or not."""
        ended = {i for i, p in self.running.items() if p.ended}
        return steps_done(self.max_iter, {i: p.steps for i, p in self.running.items()}, self.finished | ended)

    def rate(self) -> float:
        """Trained steps per second over the last RATE_WINDOW seconds."""
        return step_rate(self.history)

    def counts(self) -> dict:
        """``{running, queued, done, failed}`` right now."""
        ended = [p.ended for p in self.running.values() if p.ended]
        return state_counts(len(self.jobs), len(self.running) - len(ended), self.statuses + ended)

    def _postfix(self) -> str:
        c = self.counts()
        return f"{c['running']} running, {c['queued']} queued, {c['done']} done, {c['failed']} failed"

    # --- input ---
    def receive(self, msg: dict) -> None:
        """A progress message from a running job."""
        i = self.index.get(msg.get("key"))
        if i is None or i in self.finished:
            return
        job = self.running.get(i)
        if job is None:
            job = self.running[i] = _Partial(self.max_iter[i], time.time())
        job.add(msg)
        self.dirty.add(i)
        self._tick()

    def finished_job(self, i: int, record: dict) -> None:
        """Job ``i`` is finished and its ``record`` stored (the store dropped its live row)."""
        if i in self.finished:
            return
        self.finished.add(i)
        self.statuses.append(record.get("status", "failed"))
        self.trained_finished += int(record.get("steps") or 0)
        self.running.pop(i, None)
        self.dirty.discard(i)
        self._draw(force=True)  # no flush here: the records of a fused group arrive together, back to back

    def echo(self, stream: str, text: str) -> None:
        """A line a job printed: written above the bar (on the driver's real ``stream``)."""
        out = _real(sys.stderr if stream == "stderr" else sys.stdout)
        if self.bar is not None:
            self.bar.write(text, file=out, end="")
        else:
            out.write(text)
            out.flush()

    # --- output ---
    def _tick(self) -> None:
        """After a message: redraw the bar and flush the store when they are due."""
        self._draw()
        if self.st is not None and self.dirty and time.monotonic() >= self._next_flush:
            self._next_flush = time.monotonic() + self.every * FLUSH_PERIODS
            self.flush()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.bar is not None and (force or now >= self._next_draw):
            self._next_draw = now + BAR_INTERVAL
            self.history.append((now, self.trained()))
            while len(self.history) > 2 and self.history[1][0] < now - RATE_WINDOW:
                self.history.pop(0)
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            self.bar.update(self.position() - self.bar.n)

    def flush(self) -> None:
        """Write the partial records of the running jobs that reported since the last flush to the store."""
        rows = [(self.running[i].record(self.ids[i], self.jobs[i][0]), self.running[i].started)
                for i in self.dirty if i in self.running and self.ids[i] is not None]
        self.dirty.clear()
        if rows:
            try:
                self.st.write_live(rows)
            except Exception:  # busy or full: live rows are a courtesy, the next flush tries again
                pass

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.position() - self.bar.n)
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            self.bar.close()
            self.bar = None
