"""A job's record <-> one row of a results database: its columns, its layout (JSON) and one npz blob of arrays.

``encode(record)`` gives the column values of a row of the ``jobs`` (or ``live``) table; ``decode(row)`` the
record that was written, arrays with their dtypes. ``SELECT`` is the query whose rows ``decode`` takes.

Reading a row trusts nothing in it: arrays are read with ``allow_pickle=False`` (nothing in a row can run code),
each one's declared size is checked against the bytes that hold it before anything is allocated (a crafted blob
cannot make a reader allocate more than the row's own size), and a compressed member is refused (``np.savez``
never compresses). An array too big for a row (``EXTERNAL_BYTES``) is written beside the store, one ``.npy``
file per array (``encode``'s ``external``), and read back by ``decode`` from the store's directory only.
"""
from __future__ import annotations

import io
import json
import math
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from modelscape.backend.identity import tensor_to_numpy, is_torch_tensor, jsonable
from modelscape.results import axis_label

__all__ = ["StoreError", "STATUSES", "RECORD_COLUMNS", "SELECT", "encode", "decode", "dumps", "read_npz", "read_npy",
           "confined", "EXTERNAL_BYTES", "LIVE_SQL"]

# An array of at least this many bytes is written beside the store (one .npy file) instead of into its row:
# SQLite refuses a blob over 1 GB, and a row of hundreds of MB is slow to write and to read for everyone.
EXTERNAL_BYTES = 64 * 2**20


class StoreError(Exception):
    """A results store that cannot be used: missing, corrupt, foreign, or written by a newer version."""


# crashed: the job killed its worker process twice; timeout: it ran past JOB_TIMEOUT (see executors/pool.py)
STATUSES = ("done", "not_reached", "diverged", "failed", "crashed", "timeout")

# Record keys that live in their own column, with the Python type the column gives back.
_COLUMNS = {"status": str, "error": str, "steps": int, "wall_time": float, "device": str, "seed": int,
            "trial": int, "train_loss": float, "test_loss": float}
_INT64 = (-(2 ** 63), 2 ** 63 - 1)

# A stored record's columns: the jobs table's, and (with two more) the live table's, so a row of either decodes
# the same way.
RECORD_COLUMNS = """
    job_id     TEXT PRIMARY KEY,
    status     TEXT NOT NULL,
    axes       TEXT NOT NULL,
    config     TEXT,
    error      TEXT,
    steps      INTEGER,
    wall_time  REAL,
    device     TEXT,
    seed       INTEGER,
    trial      INTEGER,
    train_loss REAL,
    test_loss  REAL,
    created    REAL NOT NULL,
    layout     TEXT NOT NULL,
    arrays     BLOB"""


def _plain(v):
    return v.item() if isinstance(v, np.generic) and not isinstance(v, np.void) else v


def _json_exact(v) -> bool:
    """Whether ``v`` survives a JSON round trip as an equal value of the same types."""
    try:
        back = json.loads(json.dumps(v, allow_nan=True))
    except (TypeError, ValueError):
        return False
    return _same(v, back)


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _as_array(name, v) -> np.ndarray:
    arr = tensor_to_numpy(v) if is_torch_tensor(v) else np.asarray(v)
    if arr.dtype.hasobject:
        raise StoreError(f"{name} is an array of Python objects (dtype object); the store keeps numeric and "
                         "string arrays only: return numbers or a numeric array")
    return arr


def encode(record: Mapping, external=None):
    """A record -> the column values of its row (``layout`` JSON and the npz blob ``arrays`` among them).

    ``external(key, array) -> str``, if given, writes an array of ``EXTERNAL_BYTES`` or more to a file beside
    the store and returns that file's path relative to the store's directory, which the layout then names;
    without it every array goes into the blob."""
    if "job_id" not in record or "status" not in record:
        raise ValueError(f"a record needs 'job_id' and 'status'; it has keys {sorted(record)}")
    cols = {k: None for k in _COLUMNS}
    layout = {"keys": list(record), "none": [], "json": {}, "arrays": {}}
    arrays = {}

    def put_array(a):
        name = f"a{len(arrays) + len(layout.get('external', ()))}"
        if external is not None and a.nbytes >= EXTERNAL_BYTES:
            layout.setdefault("external", {})[name] = {"file": external(name, a), "shape": list(a.shape),
                                                      "dtype": a.dtype.str}
        else:
            arrays[name] = a
        return name

    for key, value in record.items():
        value = _plain(value)
        if key in ("job_id", "axes", "config"):
            continue
        if value is None:
            layout["none"].append(key)
        elif key in _COLUMNS and type(value) is _COLUMNS[key] and not (
                type(value) is int and not _INT64[0] <= value <= _INT64[1]):
            cols[key] = value
        elif key == "grabs" and isinstance(value, Mapping):
            layout["grabs"] = grabs = {}
            for gname, g in value.items():
                g = g if isinstance(g, np.generic) else _plain(g)  # numpy scalars keep their dtype
                if g is None:
                    grabs[gname] = ["none", None]
                elif isinstance(g, np.generic):
                    grabs[gname] = ["scalar", put_array(_as_array(f"grab {gname!r}", g))]
                elif isinstance(g, (bool, int, float)) and _json_exact(g):
                    grabs[gname] = ["json", g]
                else:
                    grabs[gname] = ["array", put_array(_as_array(f"grab {gname!r}", g))]
        elif isinstance(value, np.ndarray) or is_torch_tensor(value):
            layout["arrays"][key] = put_array(_as_array(f"record key {key!r}", value))
        elif _json_exact(value):
            layout["json"][key] = value
        else:  # lossy, but a record must never fail to be stored for an odd extra key
            layout["json"][key] = jsonable(value)
    if cols["status"] is None:
        raise ValueError(f"record {record['job_id']}: status must be a string, got {record['status']!r}")
    blob = None
    if arrays:
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=False, **arrays)
        blob = buf.getvalue()
    axes = {str(k): axis_label(v) for k, v in (record.get("axes") or {}).items()}
    config = dumps(jsonable(record["config"])) if "config" in record else None
    return dict(job_id=str(record["job_id"]), axes=dumps(axes), config=config,
                layout=dumps(layout), arrays=blob, **cols)


def dumps(obj) -> str:
    """Compact JSON as the store writes it (NaN allowed: Python's json reads it back)."""
    return json.dumps(obj, allow_nan=True, separators=(",", ":"))


# CAST: a damaged row may hold text where the blob belongs; read as bytes, it fails to decode as that row alone
SELECT = ("SELECT job_id, status, axes, config, error, steps, wall_time, device, seed, trial, train_loss, "
           "test_loss, layout, CAST(arrays AS BLOB) FROM jobs")


def decode(row, root=None) -> dict:
    """A row of ``SELECT`` -> the record that was written. ``root``: the store's directory, where the arrays
    written beside the store are (a row naming one cannot be read without it)."""
    (job_id, status, axes, config, error, steps, wall_time, device, seed, trial, train_loss, test_loss,
     layout, blob) = row
    layout = json.loads(layout)
    cols = dict(status=status, error=error, steps=steps, wall_time=wall_time, device=device, seed=seed,
                trial=trial, train_loss=train_loss, test_loss=test_loss)
    arrays = read_npz(blob) if blob is not None else {}
    for name, spec in (layout.get("external") or {}).items():
        arrays[name] = _read_external(job_id, spec, root)
    none, js = set(layout["none"]), layout["json"]
    out = {}
    for key in layout["keys"]:
        if key == "job_id":
            out[key] = job_id
        elif key == "axes":
            out[key] = json.loads(axes)
        elif key == "config":
            out[key] = json.loads(config) if config is not None else None
        elif key in none:
            out[key] = None
        elif key in js:
            out[key] = js[key]
        elif key in layout["arrays"]:
            out[key] = arrays[layout["arrays"][key]]
        elif key == "grabs" and "grabs" in layout:
            grabs = out[key] = {}
            for gname, (kind, ref) in layout["grabs"].items():
                grabs[gname] = (None if kind == "none" else ref if kind == "json"
                                else arrays[ref][()] if kind == "scalar" else arrays[ref])
        elif key in cols:
            v = cols[key]
            # SQLite stores NaN in a REAL column as NULL
            out[key] = float("nan") if v is None and _COLUMNS[key] is float else v
        else:
            raise StoreError(f"job {job_id}: stored layout names key {key!r} but holds no value for it")
    return out



# --------------------------------------------------------------------------------------------------------
# Reading arrays without trusting them
# --------------------------------------------------------------------------------------------------------

def read_npz(blob: bytes) -> dict:
    """The arrays of an ``np.savez`` blob, each checked before it is read: members stored uncompressed (as
    ``np.savez`` writes them; a compressed one could inflate a small blob into gigabytes), no object arrays,
    and a declared shape whose bytes the member holds. A reader thus never allocates more than the blob's size.
    StoreError names what is wrong."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(blob))
        infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise StoreError(f"the arrays blob is not an npz archive: {e}") from None
    out = {}
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise StoreError(f"array {info.filename!r} is compressed ({info.compress_size} bytes declaring "
                             f"{info.file_size}); the store writes arrays uncompressed and refuses to inflate one")
        if info.file_size > len(blob):
            raise StoreError(f"array {info.filename!r} declares {info.file_size} bytes in a blob of {len(blob)}")
        name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        with zf.open(info) as f:
            out[name] = read_npy(f, info.file_size, f"array {name!r}")
    return out


def read_npy(f, size: int, what: str) -> np.ndarray:
    """One ``.npy`` array from the open file ``f`` holding ``size`` bytes, its header checked against them
    first (see ``read_npz``)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError(f"npy format version {version} is not one the store writes")
        header = f.tell()
    except (ValueError, OSError, EOFError) as e:
        raise StoreError(f"{what}: bad npy header: {e}") from None
    if dtype.hasobject:
        raise StoreError(f"{what} holds Python objects (dtype {dtype}); the store keeps numbers and strings only")
    nbytes = math.prod(int(n) for n in shape) * dtype.itemsize
    if nbytes != size - header:
        raise StoreError(f"{what} declares shape {tuple(shape)} of {dtype} ({nbytes} bytes) but holds "
                         f"{size - header} bytes")
    buf = bytearray(nbytes)
    if f.readinto(memoryview(buf)) != nbytes:
        raise StoreError(f"{what}: its data ends early")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def confined(root, rel, what: str) -> Path:
    """``root/rel`` for a path ``rel`` read from a record, refused (StoreError) unless it stays inside ``root``
    once links are resolved: a record cannot make a reader open a file outside its store."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        raise StoreError(f"{what}: the path {rel!r} in the record is not a plain path inside the store")
    base = Path(root).resolve()
    path = (base / rel).resolve()
    if path != base and base not in path.parents:
        raise StoreError(f"{what}: the path {rel!r} in the record leads outside the store ({path})")
    return path


def _read_external(job_id, spec, root) -> np.ndarray:
    what = f"job {job_id}: array file {spec.get('file')!r}"
    if root is None:
        raise StoreError(f"{what} is beside the store, and the reader did not say where the store is")
    path = confined(root, spec.get("file"), what)
    try:
        with open(path, "rb") as f:
            arr = read_npy(f, os.fstat(f.fileno()).st_size, what)
    except FileNotFoundError:
        raise StoreError(f"{what} is missing ({path})") from None
    if list(arr.shape) != list(spec.get("shape", [])) or arr.dtype.str != spec.get("dtype"):
        raise StoreError(f"{what} holds {arr.dtype.str}{list(arr.shape)}, the row says "
                         f"{spec.get('dtype')}{spec.get('shape')}")
    return arr


# The partial records of running jobs (``write_live``), one row per job, dropped when its record is written.
# Added to any store a writer opens (older readers ignore it), so it needs no new schema version.
LIVE_SQL = f"""
CREATE TABLE IF NOT EXISTS live ({RECORD_COLUMNS},
    max_iter   INTEGER,
    started    REAL
)
"""
