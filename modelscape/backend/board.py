"""Live progress, the driver's side: the running jobs' reports in, a progress bar and the store's live rows out.

``LiveBoard`` keeps the partial state of the running jobs (the messages ``live.LiveObserver`` sends), draws the
progress bar (counted in training steps across jobs) and flushes the running jobs' partial records to the store
every few seconds, so ``modelscape.load()``, ``modelscape show`` and ``modelscape watch`` see them from other
processes. It prints a job's output lines above the bar.
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np
from tqdm import tqdm

from modelscape.backend.live import job_key, real_stream
from modelscape.results import NO_RESULT

__all__ = ["LiveBoard", "steps_done", "step_rate", "eta_seconds", "state_counts", "FLUSH_PERIODS", "BAR_INTERVAL",
           "RATE_WINDOW"]

FLUSH_PERIODS = 2  # the driver writes the running jobs' partial records to the store every this many periods
BAR_INTERVAL = 0.25  # seconds between redraws of the progress bar (at most)
RATE_WINDOW = 30.0  # seconds of history the bar's step rate (and so its ETA) is measured over


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

    ``jobs``/``ids``/``todo`` as in ``sweep.run_jobs``; ``st`` the store this driver writes (None: keep
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
        # tqdm.tqdm, plain text: tqdm.auto needs ipywidgets in a notebook
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
        out = real_stream(sys.stderr if stream == "stderr" else sys.stdout)
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
            pos = self.position()
            if pos >= self.bar.total:  # the finished bar is close()'s to draw, once
                self.bar.n = pos
                return
            self.bar.update(pos - self.bar.n)

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
            # set, not update(): update() draws the final line and close() draws it again, twice in a log file
            self.bar.n = self.position()
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            self.bar.close()
            self.bar = None
