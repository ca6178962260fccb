"""The results store of an experiment: its directory, ``RESULTS_DIR/EXPT_NAME``, read as one store.

A sweep's driver writes one SQLite file, ``results.db`` (``db.Store``: schema, transactions, claims, running jobs'
progress); other writers (the array tasks of a Slurm sweep) each write their own ``shard-*.db`` beside it, so no
SQLite file is written from two machines. ``StoreUnion`` reads the directory as one store, and ``load`` hands it
back as labelled results. The names of ``db``, ``identity``, ``rows`` and ``claims`` that code outside the
storage layer uses are importable from here.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from modelscape.backend.beside import read_spill, spilled
from modelscape.backend.claims import DEFAULT_STALE_AFTER, SCHEDULER_HOST, Driver  # noqa: F401  (re-exported)
from modelscape.backend.db import (  # noqa: F401  (re-exported)
    DB_NAME, DB_SUFFIXES, SCHEMA_VERSION, STATUSES, Store, StoreError, StoreLost, ordered_counts, resolve_db_path)
from modelscape.backend.identity import (  # noqa: F401  (re-exported: they lived here before 0.4)
    IDENTITY_VERSION, NON_RESULT_KEYS, code_fingerprint, code_versions, identity_cache, job_identity, jsonable,
    provenance)
from modelscape.backend.rows import decode
from modelscape.backend.stored import StoredResults

SELECT_NAMES = ("job_id", "status", "axes", "config", "error", "steps", "wall_time", "device", "seed", "trial",
                "train_loss", "test_loss", "layout", "arrays")  # the columns of rows.SELECT, in its order

__all__ = ["Store", "StoreUnion", "StoreError", "StoreLost", "load", "shard_path", "DB_NAME", "DB_SUFFIXES", "SCHEMA_VERSION",
           "STATUSES", "SHARD_GLOB", "Driver", "SCHEDULER_HOST", "job_identity", "identity_cache", "jsonable",
           "provenance", "code_fingerprint", "code_versions", "NON_RESULT_KEYS"]


SHARD_GLOB = "shard-*.db"  # results files written beside results.db by other writers (Slurm array tasks)


def shard_path(directory, name: str) -> Path:
    """The results file of one extra writer (``name``: letters, digits, '-' and '_') in a store directory."""
    return Path(directory) / f"shard-{name}.db"


class StoreUnion:
    """A store directory read as one store: its ``results.db``, every ``shard-*.db`` beside it, and the rows spilled
    beside them (``Spilled``) that no writer has imported yet.

    Each file has one writer (a driver, a Slurm array task), so nothing writes one SQLite file from several
    machines; readers see the union. A job appears once whichever file holds it: a record with a status other
    than failed wins over a failed one, then the newest. The sweeps (axes, job order, meta) are those
    recorded in ``results.db``. Read-only; offers the reading methods of ``Store``.
    """

    def __init__(self, path):
        self.primary = Store(path, readonly=True)
        self.path = self.primary.path
        self.stores = [self.primary]
        if self.path.name == DB_NAME:  # a store directory: shards live beside its results.db
            for f in sorted(self.path.parent.glob(SHARD_GLOB)):
                try:
                    self.stores.append(Store(f, readonly=True))
                except StoreError as e:  # e.g. an array task creating its file right now: read the rest
                    warnings.warn(f"shard file {f.name} is skipped: {e}", stacklevel=2)
        # rows a writer could not write (a full disk): read from their spill files until a writer imports them
        self.stores += [s for s in (Spilled(st.path) for st in list(self.stores)) if s.rows]

    @property
    def damaged(self) -> dict:
        return {j: why for st in self.stores for j, why in st.damaged.items()}

    def _best(self) -> dict:
        """``{job id: (status, created, store)}`` of the record each job is read from."""
        best = {}
        for st in self.stores:
            for job_id, (status, created) in st.statuses().items():
                old = best.get(job_id)
                if old is None or (status != "failed", created) > (old[0] != "failed", old[1]):
                    best[job_id] = (status, created, st)
        return best

    def done_ids(self, retry_failed: bool = False) -> set:
        return set().union(*(st.done_ids(retry_failed) for st in self.stores))

    def records(self, job_ids=None) -> list[dict]:
        best = self._best()
        if job_ids is None:
            job_ids = sorted(best, key=lambda j: best[j][1])
        job_ids = [str(j) for j in job_ids]
        found = {}
        for st in self.stores:
            mine = [j for j in dict.fromkeys(job_ids) if j in best and best[j][2] is st]
            if mine:
                found.update((r["job_id"], r) for r in st.records(mine))
        return [found[j] for j in job_ids if j in found]

    def statuses(self) -> dict:
        """``{job id: status}`` of every job some file holds a record of (the record it is read from)."""
        return {j: status for j, (status, _, _) in self._best().items()}

    def status_counts(self, sweep_id: int | None = None) -> dict:
        best = self._best()
        ids = best if sweep_id is None else self.primary.sweep_job_ids(self._check_sweep(sweep_id))
        counts = {}
        for j in ids:
            status = best[j][0] if j in best else "missing"
            counts[status] = counts.get(status, 0) + 1
        return ordered_counts(counts)

    def _check_sweep(self, sweep_id):
        ids = [s["id"] for s in self.primary.sweeps()]
        if sweep_id not in ids:
            raise StoreError(f"{self.path} has no sweep {sweep_id}; its sweeps are {ids}")
        return sweep_id

    def live_claims(self, stale_after: float = DEFAULT_STALE_AFTER) -> list[dict]:
        return [c for st in self.stores for c in st.live_claims(stale_after)]

    def live_records(self) -> dict:
        """``{job id: partial record}`` of the jobs some driver reported running and no file holds a record
        of (a finished record wins), the newest row where several files have one. Includes the rows a dead
        driver left behind: ``running_records`` keeps only those a live driver holds."""
        finished = self._best()
        out = {}
        for st in self.stores:
            for rec in st.live_records():
                j = rec["job_id"]
                if j not in finished and (j not in out or rec["updated"] > out[j]["updated"]):
                    out[j] = rec
        return out

    def running_records(self) -> dict:
        """``{job id: partial record}`` of the jobs running right now: a live row whose job a live driver
        holds (``live_claims``). A row left by a driver that died is not among them."""
        held = {c["job_id"] for c in self.live_claims()}
        return {j: r for j, r in self.live_records().items() if j in held}

    def sweeps(self) -> list[dict]:
        return self.primary.sweeps()

    def latest_sweep(self) -> int | None:
        return self.primary.latest_sweep()

    def sweep_job_ids(self, sweep_id: int) -> list[str]:
        return self.primary.sweep_job_ids(sweep_id)

    def results(self, sweep: int | None = None, running: bool = False) -> StoredResults:
        """The sweep ``sweep`` (default: the latest) with the records of its jobs stored so far; with ``running``
        also the partial records (status ``running``) of its jobs running now (``running_records``)."""
        sweep = self.latest_sweep() if sweep is None else sweep
        if sweep is None:
            raise StoreError(f"{self.path} holds no recorded sweep")
        info = next((s for s in self.sweeps() if s["id"] == sweep), None)
        if info is None:
            self._check_sweep(sweep)  # raises, naming the sweeps there are
        ids = self.sweep_job_ids(sweep)
        records = self.records(ids)
        if running:
            now = self.running_records()
            records += [now[j] for j in ids if j in now]
        return StoredResults(info["axis_names"], info["axis_values"], records, store_dir=self.path.parent)

    def close(self) -> None:
        for st in self.stores:
            st.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"StoreUnion({str(self.path)!r}, {len(self.stores) - 1} shards)"


class Spilled:
    """The rows spilled beside one database file (``beside.write_spill``), read as a store of their own: a reader
    sees the results a driver could not write, before the next writer imports them."""

    def __init__(self, db_path):
        self.path = Path(db_path)
        self.rows, self.damaged = {}, {}
        for f in spilled(self.path):
            try:
                row = read_spill(f)
            except (OSError, StoreError):  # a file being written, or garbage: the next writer sets it aside
                continue
            old = self.rows.get(row["job_id"])
            if old is None or old["created"] < row["created"]:
                self.rows[row["job_id"]] = row

    def statuses(self) -> dict:
        return {j: (r["status"], r["created"]) for j, r in self.rows.items()}

    def done_ids(self, retry_failed: bool = False) -> set:
        redo = ("failed", "crashed", "timeout") if retry_failed else ("failed",)
        return {j for j, r in self.rows.items() if r["status"] not in redo}

    def records(self, job_ids=None) -> list[dict]:
        out = []
        for j in (self.rows if job_ids is None else [str(j) for j in job_ids if str(j) in self.rows]):
            try:
                out.append(decode(tuple(self.rows[j].get(k) for k in SELECT_NAMES), self.path.parent))
            except Exception as e:  # as Store._decode: a damaged row is named and skipped
                self.damaged[j] = f"{type(e).__name__}: {e}"
        return out

    def live_records(self) -> list:
        return []

    def live_claims(self, stale_after=None) -> list:
        return []

    def close(self) -> None:
        pass


def load(path, sweep: int | None = None, running: bool = True) -> StoredResults:
    """Load a sweep from a results store, from any process, even while the sweep is still running.

    ``path``: the .db file, or the directory holding it (``RESULTS_DIR/EXPT_NAME``). ``sweep``: a sweep id
    (see ``Store(path).sweeps()``); default, the sweep run most recently. Returns the SweepResults the job
    iterator returns, with the jobs stored so far (from ``results.db`` and any shard files beside it) and,
    with ``running``, the jobs running right now: status ``running``, ``steps`` done of ``max_iter``, their
    curves so far (as of the driver's last flush, a few seconds old) and ``train_loss`` the EMA at ``steps``.
    """
    with StoreUnion(path) as store:
        return store.results(sweep, running=running)

