"""The files of a results store: which database file a store path means (``resolve_db_path``), and what a store
keeps beside its database file ``D/name.db``: arrays too big for a row, and rows that could not be written.

- ``D/name.db-arrays/<job id>/<token>-<key>.npy``: an array of ``rows.EXTERNAL_BYTES`` or more, one file each,
  named by the row that holds it (``rows.encode``'s ``external``); a job written again gets a new token and its
  old files are removed once the new row is committed.
- ``D/name.db-spill/<job id>.row``: a row the database refused (a full disk, an I/O error, a lock held too long),
  written so that its result is not lost: one line of JSON (the row's columns), then the npz blob. Should the
  store's own disk be full, the spill goes to ``$MODELSCAPE_SPILL_DIR`` or ``~/.cache/modelscape/spill``, in a
  folder named after the database's absolute path. The next driver that opens the store imports every spilled
  row (``Store`` does, keeping the newer of a spilled row and a stored one) and removes the files.

A job id becomes a file name only if it is a plain name (``check_name``): a record cannot make the store write
outside these folders.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import time
import uuid
import warnings
from pathlib import Path

import numpy as np

from modelscape.backend.rows import StoreError, dumps, encode

__all__ = ["DB_NAME", "DB_SUFFIXES", "resolve_db_path", "arrays_dir", "spill_dirs", "ExternalArrays", "write_spill", "spilled", "read_spill", "check_name",
           "keep", "import_spilled", "spill_records", "SPILL_SUFFIX", "WRITE_ATTEMPTS", "RETRY_DELAYS"]

SPILL_SUFFIX = ".row"
DB_NAME = "results.db"
DB_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_HEADER = 1 << 24  # a spill file's JSON line: the columns of one row (its config among them)


def resolve_db_path(path, create: bool = False) -> Path:
    """The database file a store path means: the file itself, or ``DIR/results.db`` for a directory.

    A path that does not exist is a file if it ends in .db/.sqlite/.sqlite3 and a directory otherwise;
    with ``create`` the missing directories are made, without it a missing store is a StoreError.
    """
    p = Path(os.fspath(path)).expanduser()
    if p.exists():  # checked first: another process may be creating the directory right now
        if not p.is_dir():
            return p
        db = p / DB_NAME
        if not create and not db.exists():
            raise StoreError(f"no results store in {p}: it holds no {DB_NAME}")
        return db
    if not create:
        raise StoreError(f"no results store at {p}: no such file or directory")
    if p.suffix.lower() in DB_SUFFIXES:
        p.parent.mkdir(parents=True, exist_ok=True)
        return p
    p.mkdir(parents=True, exist_ok=True)
    return p / DB_NAME


def check_name(name: str, what: str) -> str:
    """``name`` if it is a plain file name (letters, digits, ``.``, ``_``, ``-``; not starting with a dot),
    else StoreError: an id read from a record never becomes a path elsewhere."""
    if not isinstance(name, str) or not _PLAIN.match(name):
        raise StoreError(f"{what} {name!r} is not a plain name (letters, digits, '.', '_', '-'); refusing to "
                         "make a file of it")
    return name


def arrays_dir(db_path) -> Path:
    """The folder of a database's arrays that live beside it."""
    p = Path(db_path)
    return p.with_name(p.name + "-arrays")


def spill_dirs(db_path) -> list[Path]:
    """Where a database's refused rows go: beside it, then (its disk full) a folder in the user's cache."""
    p = Path(db_path)
    key = hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:16]
    home = os.environ.get("MODELSCAPE_SPILL_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "modelscape",
                                                                  "spill")
    return [p.with_name(p.name + "-spill"), Path(home) / f"{p.stem}-{key}"]


def _atomic_write(path: Path, write) -> None:
    """``write(f)`` into a temporary file beside ``path``, synced, then renamed to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class ExternalArrays:
    """``rows.encode``'s ``external`` for one record: writes each big array to its own file and remembers them,
    so that ``commit`` removes the job's older files and ``abandon`` this write's own."""

    def __init__(self, db_path, job_id: str):
        self.root = Path(db_path).parent
        self.dir = arrays_dir(db_path) / check_name(job_id, "job id")
        self.token = uuid.uuid4().hex[:12]
        self.written: list[Path] = []

    def __call__(self, key: str, arr: np.ndarray) -> str:
        path = self.dir / f"{self.token}-{check_name(key, 'array key')}.npy"
        _atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))
        self.written.append(path)
        return str(path.relative_to(self.root))

    def commit(self) -> None:
        """The row naming this write's files is committed: the job's files from earlier writes go."""
        if not self.dir.is_dir():
            return
        for f in self.dir.iterdir():
            if not f.name.startswith(self.token + "-"):
                try:
                    f.unlink()
                except OSError:
                    pass

    def abandon(self) -> None:
        for f in self.written:
            try:
                f.unlink()
            except OSError:
                pass


# --------------------------------------------------------------------------------------------------------
# Spilled rows
# --------------------------------------------------------------------------------------------------------

def write_spill(db_path, row: dict) -> Path:
    """Write one row (``rows.encode``'s columns, ``created`` included) as a spill file; returns its path. Tries
    beside the store first, then the fallback folder; OSError (with both causes) when neither takes it."""
    name = check_name(row["job_id"], "job id") + SPILL_SUFFIX
    head = {k: v for k, v in row.items() if k != "arrays"}
    blob = row.get("arrays")
    data = dumps(head).encode() + b"\n"
    errors = []
    for folder in spill_dirs(db_path):
        try:
            _atomic_write(folder / name, lambda f: (f.write(data), f.write(blob or b"")))
            return folder / name
        except OSError as e:
            errors.append(f"{folder}: {e.strerror or e}")
    raise OSError("; ".join(errors))


def spilled(db_path) -> list[Path]:
    """The spill files of a database, in every place they may be (oldest first)."""
    files = []
    for folder in spill_dirs(db_path):
        try:
            files += [f for f in folder.iterdir() if f.name.endswith(SPILL_SUFFIX) and not f.name.startswith(".")]
        except OSError:  # no such folder: nothing spilled there
            pass
    return sorted(files, key=lambda f: f.stat().st_mtime if f.exists() else 0)


def read_spill(path: Path) -> dict:
    """The row of a spill file (columns, ``arrays`` the blob or None); StoreError if it is not one."""
    with open(path, "rb") as f:
        line = f.readline(_MAX_HEADER)
        if not line.endswith(b"\n"):
            raise StoreError(f"spill file {path} does not start with a line of JSON")
        try:
            row = json.loads(line)
        except ValueError as e:
            raise StoreError(f"spill file {path}: {e}") from None
        blob = f.read()
    if not isinstance(row, dict) or not isinstance(row.get("job_id"), str) or not isinstance(row.get("layout"), str):
        raise StoreError(f"spill file {path} holds no row")
    check_name(row["job_id"], f"spill file {path}: job id")
    row["arrays"] = blob or None
    return row


# --------------------------------------------------------------------------------------------------------
# A store's writes that must not be lost
# --------------------------------------------------------------------------------------------------------

# ``keep``: a write the database refuses is tried this many times, these many seconds apart, before it spills
WRITE_ATTEMPTS = 3
RETRY_DELAYS = (0.5, 2.0)


def keep(store, records) -> str | None:
    """Write ``records`` into ``store`` (a ``db.Store``) in one transaction, whatever the database does meanwhile:
    a write it refuses (a full disk, an I/O error, a lock held past the timeout) is tried ``WRITE_ATTEMPTS`` times,
    then each row is spilled (``write_spill``) for the next writer to import. Returns None when stored, else a
    line saying why not (the database's own error) and where the rows went.

    Raises ``db.StoreLost``, after spilling the rows, when the store's file was deleted or replaced; the record's
    own faults (an array of objects: StoreError, ValueError) at once, untried; OSError when the rows could be
    neither written nor spilled (with both causes)."""
    rows, externals = store._rows(records)
    cause = None
    for attempt in range(WRITE_ATTEMPTS):
        try:
            store._insert(rows)
            for ext in externals:
                ext.commit()
            return None
        except StoreError as e:
            if type(e).__name__ == "StoreLost":
                _spill(store.path, rows, "the store's file is gone")
                raise
            cause = str(e.__cause__ or e)
            if attempt + 1 < WRITE_ATTEMPTS:
                time.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
    where = _spill(store.path, rows, cause)
    return (f"could not be written to {store.path} ({cause}; {WRITE_ATTEMPTS} attempts); kept in {where}, which the "
            "next run on this store imports")


def _spill(db_path, rows, cause) -> str:
    folders = []
    for row in rows:
        try:
            folders.append(str(write_spill(db_path, row).parent))
        except (OSError, StoreError) as e:
            raise OSError(f"could not be written to {db_path} ({cause}) nor spilled ({e})") from None
    return ", ".join(dict.fromkeys(folders))


def import_spilled(store) -> int:
    """Write the rows earlier writers of ``store`` spilled into it, each unless the store holds a newer row of its
    job, and remove their files; returns how many. A spill file that is not one is renamed ``*.bad``."""
    files = spilled(store.path)
    done = 0
    for f in files:
        try:
            row = read_spill(f)
        except (OSError, StoreError) as e:
            warnings.warn(f"{f} is not a readable spilled result ({e}); renamed to {f.name}.bad", stacklevel=3)
            with contextlib.suppress(OSError):
                os.replace(f, f.with_name(f.name + ".bad"))
            continue
        try:
            store._insert_spilled(row, f)
        except StoreError as e:  # the disk still full, say: the files wait for the next writer
            if type(e).__name__ == "StoreLost":
                raise
            warnings.warn(f"{len(files) - done} spilled result(s) in {f.parent} could not be imported into "
                          f"{store.path} yet ({e.__cause__ or e}); the next run tries again", stacklevel=3)
            break
        with contextlib.suppress(OSError):
            f.unlink()
        done += 1
    if done:
        print(f"modelscape: imported {done} result(s) an earlier run could not write to {store.path} (spilled to "
              f"{files[0].parent})", file=sys.stderr)
    return done


def spill_records(db_path, records) -> str:
    """Spill ``records`` (each as ``Store.write`` takes it) beside the database ``db_path`` without touching
    the database (it is gone, say); returns where they went. OSError when they could not be written anywhere."""
    rows = []
    for record in records:
        row = encode(record)
        row["created"] = time.time()
        rows.append(row)
    return _spill(db_path, rows, "the store's file is gone") if rows else ""
