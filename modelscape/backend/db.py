"""One results database: a SQLite file of finished jobs, sweeps, claims and running jobs' progress.

A sweep's driver opens ``Store(RESULTS_DIR/EXPT_NAME)`` and calls ``write(record)`` the moment each job's
record arrives; every write is its own transaction, so a sweep killed at any point leaves every job finished
before it on disk. Readers in other processes (``load``, the ``modelscape`` command) see a consistent snapshot
while the driver keeps writing (SQLite's WAL mode).

Layout (schema version ``SCHEMA_VERSION``, kept in ``PRAGMA user_version``; ``PRAGMA application_id`` marks
the file as ours):

- ``jobs``: one row per job identity (``job_identity``): status, axes (labels, JSON), the resolved config
  (``jsonable``, JSON), error, steps, wall_time, device, seed, trial, train_loss, test_loss, created time,
  ``layout`` (JSON: which record keys exist and where each lives) and ``arrays``, one ``np.savez`` blob holding
  every array of the record (timekeys, curves, grabs). Arrays are read back with ``allow_pickle=False``.
- ``sweeps``: one row per distinct sweep (axis names, axis values as labels, meta); re-running the same sweep
  reuses its row and bumps ``last_run``.
- ``sweep_jobs``: which job ids, in product order, make up a sweep.
- ``claims`` (schema 2): which driver (host, pid, start time, last heartbeat) is running each job right now, so
  that several drivers on one store share a sweep's jobs instead of training each twice (``claim``,
  ``heartbeat``, ``release``, ``live_claims``). A schema-1 store gains the table when it is opened for writing.
- ``live``: the partial record (columns as in ``jobs``, plus ``max_iter`` and ``started``) of each job its driver
  reported running (``write_live``, every few seconds), dropped in the transaction that writes the job's record.
  A row whose job no live driver holds is what a dead driver left: ``StoreUnion.running_records`` leaves it out.
  Created, if missing, whenever a store is opened for writing; readers of older versions ignore it.

A job's identity hashes everything that decides its numbers and nothing else (``identity.job_identity``); a
record becomes a row as ``rows.encode`` says; claims name their driver as ``claims.Driver`` does.

Other writers (the array tasks of a Slurm sweep) each write their own ``shard-*.db`` beside ``results.db``;
``store.StoreUnion`` reads the directory as one store. What a store keeps beside its file (arrays too big for a
row, rows it refused, spilled for the next writer to import) is ``beside``. A writer checks before each commit
that its file and its WAL are the ones it opened (``check_file``: ``StoreLost`` otherwise).
"""
from __future__ import annotations

__all__ = ["Store", "StoreError", "StoreLost", "DB_NAME", "DB_SUFFIXES", "SCHEMA_VERSION", "STATUSES", "resolve_db_path",
           "ordered_counts"]

import contextlib
import hashlib
import json
import math
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Mapping

from modelscape.backend.beside import (  # noqa: F401  (DB_NAME, DB_SUFFIXES, resolve_db_path: re-exported)
    DB_NAME, DB_SUFFIXES, ExternalArrays, import_spilled, keep, resolve_db_path)
from modelscape.backend.claims import CLAIMS_SQL, ClaimsTable, Driver  # noqa: F401  (Driver: the type claims name)
from modelscape.backend.identity import canonical_json, jsonable
from modelscape.backend.rows import LIVE_SQL, RECORD_COLUMNS, SELECT, STATUSES, StoreError, decode, dumps, encode
from modelscape.backend.units import UNIT_INSERT, UNIT_SELECT, UNITS_SQL, unit_rows, whole_units
from modelscape.backend.stored import StoredResults
from modelscape.results import axis_label

SCHEMA_VERSION = 2  # 2: the claims table
APPLICATION_ID = 0x4D534350  # "MSCP": tells our databases from other SQLite files
PAGE_SIZE = 32768

_SCHEMA_SQL = f"""
CREATE TABLE jobs ({RECORD_COLUMNS}
);
CREATE INDEX jobs_status ON jobs(status);
CREATE TABLE sweeps (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    created     REAL NOT NULL,
    last_run    REAL NOT NULL,
    runs        INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    axis_names  TEXT NOT NULL,
    axis_values TEXT NOT NULL,
    meta        TEXT
);
CREATE INDEX sweeps_fingerprint ON sweeps(fingerprint);
CREATE TABLE sweep_jobs (
    sweep_id INTEGER NOT NULL REFERENCES sweeps(id),
    position INTEGER NOT NULL,
    job_id   TEXT NOT NULL,
    PRIMARY KEY (sweep_id, position)
);
CREATE INDEX sweep_jobs_job ON sweep_jobs(job_id);
"""
_OUR_TABLES = {"jobs", "sweeps", "sweep_jobs"}  # every schema version has these
_ROW_NAMES = ("job_id", "status", "axes", "config", "error", "steps", "wall_time", "device", "seed", "trial",
              "train_loss", "test_loss", "created", "layout", "arrays")


class StoreLost(StoreError):
    """The database file a Store writes was deleted or replaced, or its write-ahead log vanished, while the
    Store had it open: whatever it writes from now on lands where no reader will find it."""


# (device, inode) -> how many connections this process holds to that database file. SQLite's locks are POSIX
# advisory locks, which the kernel drops for the whole process the moment the process closes *any* descriptor of
# the file: reading a file's header while this process has a connection to it would cancel that connection's
# locks (another process could then think itself the last user and delete the WAL, or worse).
_OPEN_HERE: dict = {}


def _file_id(path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


# --- the store ------------------------------------------------------------------------------------------

def _run_script(conn, sql):
    for stmt in sql.split(";"):
        if stmt.strip():
            conn.execute(stmt)


class Store(ClaimsTable):
    """The SQLite results store of one experiment. ``Store(path)`` opens (creating it if needed) ``path``
    if it is a .db file, else ``path/results.db``; ``readonly=True`` opens an existing store for reading only.

    Drivers write (several may share a store: see ``claim``); any number of processes may read meanwhile.
    A file that is not a modelscape store raises ``StoreError`` naming it. Usable as a context manager; safe
    to share between threads of one process (calls are serialized). A read-only store in a directory SQLite
    cannot write to is opened as an immutable file (``immutable`` is then True).
    """

    def __init__(self, path, readonly: bool = False, timeout: float = 30.0):
        self.readonly = readonly
        self.path = resolve_db_path(path, create=not readonly)
        self._lock = threading.RLock()
        self._conn = None
        self.immutable = False  # opened read-only in a place where SQLite cannot even make its -shm file
        self.damaged: dict[str, str] = {}  # job id -> why its row could not be read (filled by readers)
        self._ident = None  # a writer's (device, inode) of its file and of its WAL: checked around each commit
        self._wal = self.path.with_name(self.path.name + "-wal")
        self._opened = None  # the file's id while this Store holds a connection to it (see _OPEN_HERE)
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a directory, not a results database")
        self._check_header()
        try:
            self._conn = self._connect(timeout)
            self._opened = _file_id(self.path)
            _OPEN_HERE[self._opened] = _OPEN_HERE.get(self._opened, 0) + 1
            self._check_schema()
            if not readonly:
                self._enable_wal(timeout)
                self._conn.execute("PRAGMA synchronous = NORMAL")
                self._conn.execute(LIVE_SQL)
                self._ident = [_file_id(self.path), _file_id(self._wal)]
                import_spilled(self)
                self._conn.execute(UNITS_SQL)
        except sqlite3.DatabaseError as e:
            self.close()
            raise StoreError(f"{self.path} is not a usable results store: {e}") from None
        except BaseException:
            self.close()
            raise

    def _enable_wal(self, timeout):
        """Switch the file to WAL (once: the mode is stored in the file). The switch needs the file to itself
        and SQLite reports "locked" at once, without waiting, while another process has it open (several
        processes opening a new store together): try again until ``timeout``."""
        deadline = time.monotonic() + timeout
        while self._conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            try:
                self._conn.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _connect(self, timeout):
        def connect(target, uri=False):
            conn = sqlite3.connect(target, uri=uri, timeout=timeout, isolation_level=None, check_same_thread=False)
            # Text that is not UTF-8 (a damaged row) must not fail a whole query: it decodes with U+FFFD marks,
            # and the row's JSON then fails to parse, which names that one row as damaged.
            conn.text_factory = lambda b: b.decode("utf-8", "replace")
            conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            return conn

        if not self.readonly:
            return connect(self.path)
        uri = self.path.resolve().as_uri()
        conn = connect(f"{uri}?mode=ro", uri=True)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError as e:
            conn.close()
            msg = str(e).lower()
            if "readonly" not in msg and "read-only" not in msg and "unable to open" not in msg:
                raise
        # A WAL database needs its -shm file even to read; in a read-only directory SQLite cannot create it.
        # Nobody can be writing there either, so the file can be read as immutable (no locks, no WAL).
        self.immutable = True
        return connect(f"{uri}?mode=ro&immutable=1", uri=True)

    def _check_header(self):
        # sqlite only notices a foreign file at the first query, with a bare "file is not a database"
        if _file_id(self.path) in _OPEN_HERE:  # open here already, so known to be ours; reading would unlock it
            return
        for attempt in range(40):
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                return
            if size == 0:
                if self.readonly:
                    raise StoreError(f"{self.path} is an empty file, not a results store")
                return
            with open(self.path, "rb") as f:
                head = f.read(16)
            if head == b"SQLite format 3\x00":
                return
            # Another process may be writing the first page of a store it is creating right now: a header read
            # in the middle of that write is short or zeros. Look again before calling the file foreign.
            if len(head) == 16 and any(head):
                break
            time.sleep(0.05)
        raise StoreError(f"{self.path} is not a modelscape results store (not an SQLite database; "
                         f"it starts with {head[:8]!r})")

    def _schema_state(self):
        """``(application_id, user_version, tables)`` read in one transaction: read one by one, they could
        straddle another process's creation of the schema and look like a foreign database."""
        conn = self._conn
        conn.execute("BEGIN")
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.execute("COMMIT")
        return app_id, version, tables

    def _check_schema(self):
        app_id, version, tables = self._schema_state()
        if app_id == 0 and not tables and not self.readonly:
            self._create_schema()
            app_id, version, tables = self._schema_state()
        if app_id == APPLICATION_ID:
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer modelscape (store schema {version}; this "
                                 f"version reads up to {SCHEMA_VERSION}); upgrade modelscape")
            if not _OUR_TABLES <= tables:
                raise StoreError(f"{self.path} is a damaged results store: tables "
                                 f"{sorted(_OUR_TABLES - tables)} are missing")
            if version < 2 and not self.readonly:
                self._migrate()
            return
        what = f"its tables are {sorted(tables)}" if tables else "it holds no tables"
        raise StoreError(f"{self.path} is an SQLite database but not a modelscape results store ({what})")

    def _create_schema(self):
        conn = self._conn
        # Rows carry blobs of 0.1-10 MB; 32 KiB pages halve the write time of a 4 MB grab against SQLite's
        # default 4 KiB for ~3% more space. Only possible while the file is empty.
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        with self._write_transaction(conn):
            # another process may have created it between our check and the lock
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                _run_script(conn, _SCHEMA_SQL + CLAIMS_SQL)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _migrate(self):
        """Schema 1 -> 2: add the claims table (a schema-1 store is otherwise unchanged)."""
        conn = self._conn
        with self._write_transaction(conn):
            if conn.execute("PRAGMA user_version").fetchone()[0] < 2:  # not done by another process meanwhile
                _run_script(conn, CLAIMS_SQL)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _write_transaction(self, conn):
        """One write transaction, the file's identity checked before it begins and before it commits (see
        ``check_file``). Should SQLite have rolled back by itself (a full disk, an I/O error), the error that
        made it do so is the one raised, not the failed ROLLBACK's."""
        self.check_file()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.check_file()
            conn.execute("COMMIT")
        except BaseException:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:  # "no transaction is active": SQLite rolled back already
                pass
            raise
        if self._ident is not None and self._ident[1] is None:
            self._ident[1] = _file_id(self._wal)  # the WAL exists from the first commit on

    def check_file(self) -> None:
        """A writer's check that its database file is the one it opened and that its write-ahead log is still
        there: StoreLost otherwise (a file deleted or replaced while a sweep writes it; a WAL deleted by hand,
        which takes the latest commits with it). A reader, or a Store not fully open, checks nothing."""
        if self._ident is None:
            return
        db, wal = self._ident
        now = _file_id(self.path)
        if now != db:
            what = "was deleted" if now is None else "was replaced by another file"
            raise StoreLost(f"the results store {self.path} {what} while this process was writing to it")
        if wal is not None and _file_id(self._wal) != wal:
            raise StoreLost(f"{self._wal}, the write-ahead log holding the latest results written to {self.path}, "
                            "vanished or was replaced while this process was writing to it, taking the results "
                            "committed since its last checkpoint out of the store")

    def salvage(self) -> str:
        """After ``StoreLost`` for a vanished WAL: copy every commit this connection still sees (its open handle
        on the deleted log holds them) into the database file and empty the log, so that the file holds them and
        the next process to open the store finds it consistent. Returns a line saying what was done."""
        if self._ident is None or self._conn is None or _file_id(self.path) != self._ident[0]:
            return "the store's file itself is gone: nothing to copy back into it"
        with self._lock:
            try:
                busy, log, done = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.Error as e:
                return f"copying the lost log's commits back into {self.path} failed ({e})"
        if busy or done < log:
            return f"only {done} of {log} pages of the lost log could be copied back into {self.path} (a reader held it)"
        return f"every commit of the lost log was copied back into {self.path}"

    @contextlib.contextmanager
    def _guard(self, what: str):
        """Serialize access and turn sqlite's errors into a StoreError naming the file."""
        if self._conn is None:
            raise StoreError(f"store {self.path} is closed")
        with self._lock:
            try:
                yield self._conn
            except sqlite3.DatabaseError as e:
                raise StoreError(f"{what} in {self.path} failed: {e}") from e

    @contextlib.contextmanager
    def _snapshot(self, what: str):
        """One read transaction, so several SELECTs see the same committed state."""
        with self._guard(what) as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    # --- writing ---
    def begin_sweep(self, axis_names, axis_values, job_ids, meta=None) -> int:
        """Record the sweep about to run: its axes and the ids of its jobs in product order. Returns its id.

        Re-running the same sweep (same axes, values and job ids) reuses its id; ``meta`` (JSON-able, via
        ``jsonable``) replaces the stored one.
        """
        self._writable()
        axis_names = [str(n) for n in axis_names]
        labels = [[axis_label(v) for v in vals] for vals in axis_values]
        job_ids = [str(j) for j in job_ids]
        if len(axis_names) != len(labels):
            raise ValueError(f"{len(axis_names)} axis names {axis_names} but {len(labels)} lists of values")
        n = math.prod(len(v) for v in labels)
        if len(job_ids) != n:
            raise ValueError(f"the sweep over {dict(zip(axis_names, labels))} has {n} jobs but {len(job_ids)} "
                             "job ids were given")
        fingerprint = hashlib.sha256(canonical_json([axis_names, labels, job_ids]).encode()).hexdigest()
        now = time.time()
        meta_json = dumps(jsonable(meta)) if meta is not None else None
        with self._guard("recording a sweep") as conn, self._write_transaction(conn):
            row = conn.execute("SELECT id FROM sweeps WHERE fingerprint = ?", (fingerprint,)).fetchone()
            if row is not None:
                sweep_id = row[0]
                conn.execute("UPDATE sweeps SET last_run = ?, runs = runs + 1, meta = coalesce(?, meta) "
                             "WHERE id = ?", (now, meta_json, sweep_id))
            else:
                cur = conn.execute(
                    "INSERT INTO sweeps (created, last_run, runs, fingerprint, axis_names, axis_values, meta) "
                    "VALUES (?, ?, 1, ?, ?, ?, ?)",
                    (now, now, fingerprint, dumps(axis_names), dumps(labels), meta_json))
                sweep_id = cur.lastrowid
                conn.executemany("INSERT INTO sweep_jobs (sweep_id, position, job_id) VALUES (?, ?, ?)",
                                 [(sweep_id, i, j) for i, j in enumerate(job_ids)])
        return sweep_id

    def write(self, record: Mapping) -> None:
        """Store one job's record, committed at once (replacing any earlier row of the same ``job_id``).

        Record keys: ``job_id`` and ``status`` are required; axis values are stored as labels (``axis_label``),
        ``config`` as ``jsonable(config)``; arrays (top-level and in ``grabs``) go to one npz blob with their
        dtypes; everything else is read back as written. A grab of dtype object raises StoreError.
        """
        self.write_many([record])

    def write_many(self, records) -> None:
        """Store several records (each as ``write`` takes it) in one transaction: all of them, or, should the
        process die or a record be refused, none. An array too big for a row goes to a file beside the store
        (``beside``)."""
        self._writable()
        rows, externals = self._rows(records)
        try:
            self._insert(rows)
        except BaseException:
            for ext in externals:
                ext.abandon()
            raise
        for ext in externals:
            ext.commit()

    def keep(self, records) -> str | None:
        """Store records as ``write_many`` does, whatever the database does meanwhile: see ``beside.keep``
        (retried, then spilled to a file the next writer imports). None when stored, else why not and where
        the records went."""
        self._writable()
        return keep(self, records)

    def _rows(self, records):
        rows, externals = [], []
        for record in records:
            ext = None
            try:
                ext = ExternalArrays(self.path, str(record.get("job_id")))
            except StoreError:  # an id that is no plain name: its arrays stay in its row
                pass
            try:
                row = encode(record, ext)
            except OSError:  # the arrays' disk is full: into the row, then (should that fail too) into a spill
                if ext is not None:
                    ext.abandon()
                ext = None
                row = encode(record)
            row["created"] = time.time()
            rows.append(row)
            if ext is not None:
                externals.append(ext)
        return rows, externals

    def _insert(self, rows) -> None:
        if not rows:
            return
        what = f"writing job {rows[0]['job_id']}" if len(rows) == 1 else f"writing {len(rows)} jobs"
        with self._guard(what) as conn, self._write_transaction(conn):
            for row in rows:
                names = list(row)
                conn.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(names)}) VALUES "
                             f"({', '.join('?' * len(names))})", [row[k] for k in names])
                conn.execute("DELETE FROM live WHERE job_id = ?", (row["job_id"],))  # the final record wins

    def _insert_spilled(self, row: dict, source) -> None:
        """Insert one spilled row (``beside.import_spilled``) unless this store holds a newer row of its job."""
        row = {k: row.get(k) for k in _ROW_NAMES}
        with self._guard(f"importing the spilled result {source}") as conn, self._write_transaction(conn):
            old = conn.execute("SELECT status, created FROM jobs WHERE job_id = ?", (row["job_id"],)).fetchone()
            if old is None or (old[0] == "failed" and row["status"] != "failed") or old[1] < row["created"]:
                conn.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(_ROW_NAMES)}) VALUES "
                             f"({', '.join('?' * len(_ROW_NAMES))})", [row[k] for k in _ROW_NAMES])

    def write_live(self, partials) -> None:
        """Store the partial records of running jobs, in one transaction: ``partials`` is a list of
        ``(record, started)``, each record shaped as a finished one (``job_id``, ``status`` 'running', ``axes``,
        ``steps``, ``max_iter``, curves so far) and ``started`` the time the job began. Replaces each job's
        earlier live row; ``write`` drops it."""
        self._writable()
        rows = []
        for record, started in partials:
            row = encode({k: v for k, v in record.items() if k != "max_iter"})
            row.update(created=time.time(), max_iter=record.get("max_iter"), started=started)
            rows.append(row)
        if not rows:
            return
        names = list(rows[0])
        with self._guard("writing the progress of running jobs") as conn, self._write_transaction(conn):
            conn.executemany(f"INSERT OR REPLACE INTO live ({', '.join(names)}) VALUES "
                             f"({', '.join('?' * len(names))})", [[r[k] for k in names] for r in rows])

    def _writable(self):
        if self.readonly:
            raise StoreError(f"store {self.path} was opened read-only")

    # --- reading ---
    def statuses(self) -> dict:
        """``{job id: (status, time written)}`` of every stored job, without reading their arrays."""
        with self._guard("reading job statuses") as conn:
            return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT job_id, status, created FROM jobs")}

    def done_ids(self, retry_failed: bool = False) -> set:
        """Ids of the jobs a resumed sweep skips: every stored status but ``failed`` (and, with
        ``retry_failed``, but ``crashed`` and ``timeout`` too)."""
        redo = ("failed", "crashed", "timeout") if retry_failed else ("failed",)
        marks = ",".join("?" * len(redo))
        with self._guard("reading job ids") as conn:
            return {r[0] for r in conn.execute(f"SELECT job_id FROM jobs WHERE status NOT IN ({marks})", redo)}

    def records(self, job_ids=None) -> list[dict]:
        """Stored records: all of them (in the order written), or those of ``job_ids`` that are present, in
        that order."""
        with self._snapshot("reading records") as conn:
            return self._records(conn, job_ids)

    def _records(self, conn, job_ids):
        if job_ids is None:
            rows = conn.execute(SELECT + " ORDER BY created, rowid").fetchall()
            return [r for r in map(self._decode, rows) if r is not None]
        job_ids = [str(j) for j in job_ids]
        found = {}
        unique = list(dict.fromkeys(job_ids))
        for i in range(0, len(unique), 500):  # stay under SQLite's limit on bound parameters
            chunk = unique[i:i + 500]
            q = SELECT + f" WHERE job_id IN ({', '.join('?' * len(chunk))})"
            for r in conn.execute(q, chunk):
                found[r[0]] = r
        decoded = {j: self._decode(r) for j, r in found.items()}
        return [decoded[j] for j in job_ids if decoded.get(j) is not None]

    def _decode(self, row):
        """The record of a row, or None for a damaged row: it is named in a warning and in ``self.damaged``,
        and readers go on without it (a resumed sweep trains the job again and overwrites the row)."""
        try:
            return decode(row, self.path.parent)
        except Exception as e:  # a damaged blob or layout: SQLite keeps no checksums of its contents
            why = f"{type(e).__name__}: {e}"
            if row[0] not in self.damaged:
                warnings.warn(f"job {row[0]} in {self.path} is damaged and is skipped ({why}); a resumed sweep "
                              "trains it again", stacklevel=4)
            self.damaged[row[0]] = why
            return None

    def live_records(self) -> list[dict]:
        """The partial records of the jobs a driver reported running (``write_live``), whether or not that
        driver still lives (see ``StoreUnion.running_records``); each has ``max_iter``, ``started`` and
        ``updated`` (the time of its last flush). Empty for a store written before live rows existed."""
        with self._snapshot("reading running jobs") as conn:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'live'").fetchone():
                return []
            rows = conn.execute(SELECT.replace("FROM jobs", ", max_iter, started, created FROM live")).fetchall()
        out = []
        for row in rows:
            rec = self._decode(row[:-3])
            if rec is not None:
                rec.update(max_iter=row[-3], started=row[-2], updated=row[-1])
                out.append(rec)
        return out

    def record_units(self, units) -> None:
        """Record a sweep's planned units of work (lists of job ids, each trained as one fused group), replacing
        the units their jobs were in before (``backend.units``)."""
        self._writable()
        with self._guard("recording units of work") as conn, self._write_transaction(conn):
            conn.executemany(UNIT_INSERT, unit_rows(units))

    def units(self, job_ids) -> list[list[str]]:
        """The recorded units of work (``record_units``) holding any of ``job_ids``, whole."""
        with self._snapshot("reading units of work") as conn:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'units'").fetchone():
                return []  # no writer of this version has opened the store
            return whole_units(conn.execute(UNIT_SELECT).fetchall(), job_ids)

    def sweeps(self) -> list[dict]:
        """The recorded sweeps, oldest first: id, created, last_run, runs, axis_names, axis_values (labels),
        meta and n_jobs."""
        with self._guard("reading sweeps") as conn:
            rows = conn.execute(
                "SELECT s.id, s.created, s.last_run, s.runs, s.axis_names, s.axis_values, s.meta, "
                "(SELECT count(*) FROM sweep_jobs j WHERE j.sweep_id = s.id) FROM sweeps s ORDER BY s.id").fetchall()
        return [dict(id=r[0], created=r[1], last_run=r[2], runs=r[3], axis_names=json.loads(r[4]),
                     axis_values=json.loads(r[5]), meta=json.loads(r[6]) if r[6] is not None else None, n_jobs=r[7])
                for r in rows]

    def latest_sweep(self) -> int | None:
        """The id of the sweep run most recently, or None if none was recorded."""
        with self._guard("reading sweeps") as conn:
            row = conn.execute("SELECT id FROM sweeps ORDER BY last_run DESC, id DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def sweep_job_ids(self, sweep_id: int) -> list[str]:
        """The job ids of sweep ``sweep_id`` in product order."""
        with self._guard("reading a sweep") as conn:
            return self._sweep_job_ids(conn, sweep_id)

    def _sweep_job_ids(self, conn, sweep_id):
        return [r[0] for r in conn.execute("SELECT job_id FROM sweep_jobs WHERE sweep_id = ? ORDER BY position",
                                           (sweep_id,))]

    def status_counts(self, sweep_id: int | None = None) -> dict:
        """``{status: number of jobs}`` over the whole store, or over one sweep (its jobs not stored yet
        count as ``missing``)."""
        with self._snapshot("counting jobs") as conn:
            if sweep_id is None:
                rows = conn.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall()
                return ordered_counts(dict(rows))
            self._sweep_row(conn, sweep_id)
            rows = conn.execute(
                "SELECT coalesce(j.status, 'missing'), count(*) FROM sweep_jobs s LEFT JOIN jobs j "
                "ON j.job_id = s.job_id WHERE s.sweep_id = ? GROUP BY 1", (sweep_id,)).fetchall()
            return ordered_counts(dict(rows))

    def _sweep_row(self, conn, sweep_id):
        row = conn.execute("SELECT axis_names, axis_values FROM sweeps WHERE id = ?", (int(sweep_id),)).fetchone()
        if row is None:
            ids = [r[0] for r in conn.execute("SELECT id FROM sweeps ORDER BY id")]
            raise StoreError(f"{self.path} has no sweep {sweep_id}; its sweeps are {ids}")
        return json.loads(row[0]), json.loads(row[1])

    def results(self, sweep: int | None = None) -> StoredResults:
        """The sweep ``sweep`` (default: the one run most recently) as SweepResults, with the records of its
        jobs stored so far."""
        with self._snapshot("reading a sweep") as conn:
            if sweep is None:
                row = conn.execute("SELECT id FROM sweeps ORDER BY last_run DESC, id DESC LIMIT 1").fetchone()
                if row is None:
                    raise StoreError(f"{self.path} holds no recorded sweep")
                sweep = row[0]
            names, values = self._sweep_row(conn, sweep)
            records = self._records(conn, self._sweep_job_ids(conn, sweep))
        return StoredResults(names, values, records, store_dir=self.path.parent)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._opened is not None:
                _OPEN_HERE[self._opened] -= 1
                if not _OPEN_HERE[self._opened]:
                    del _OPEN_HERE[self._opened]
                self._opened = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"Store({str(self.path)!r}{', readonly=True' if self.readonly else ''})"


def ordered_counts(counts: dict) -> dict:
    """``counts`` ({status: n}) in the order of ``STATUSES``, then ``missing``, then any other status."""
    order = {s: i for i, s in enumerate(STATUSES + ("missing",))}
    return {k: counts[k] for k in sorted(counts, key=lambda s: (order.get(s, len(order)), s))}

