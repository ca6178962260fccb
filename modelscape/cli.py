"""The ``modelscape`` command: look inside results stores without opening a notebook.

    modelscape ls PATH                      experiments under PATH: their jobs by status (stored ones, and
                                            running, interrupted and queued ones), sweeps
    modelscape show PATH [--status S] [--where AXIS=VALUE ...] [--sweep N]
                                            one row per job of a sweep (default: the latest), then
                                            where it ran (host, git commit, versions) and its code versions
    modelscape watch PATH [--every S] [--sweep N]
                                            the running jobs of a sweep (steps, losses, elapsed) and
                                            counts of queued/done/failed, refreshed until none runs
    modelscape export PATH (--csv FILE | --netcdf FILE) [--sweep N]

PATH is a results directory holding experiments (``RESULTS_DIR``), one experiment's directory
(``RESULTS_DIR/EXPT_NAME``) or its ``results.db``. Exit status: 0 success, 1 a missing, corrupt or foreign
store (or nothing to export), 2 a bad command line.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import itertools
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from modelscape.backend.store import DB_NAME, DB_SUFFIXES, STATUSES, StoreError, StoreUnion
from modelscape.results import NO_RESULT, threshold_grid

__all__ = ["main", "build_parser", "find_stores", "sweep_rows", "experiment_counts", "watch_view", "UsageError"]

SCALARS = ("steps", "wall_time", "train_loss", "test_loss", "device", "seed", "trial")
# netCDF engines in xarray's order of preference, by the module that provides each
NETCDF_ENGINES = (("netCDF4", "netcdf4"), ("h5netcdf", "h5netcdf"), ("scipy", "scipy"))
WATCH_IDLE_LOOKS = 3  # refreshes with nothing running (but jobs left) before ``watch`` gives up


class UsageError(Exception):
    """A bad command line that argparse cannot see (an unknown axis in --where)."""


def find_stores(path) -> list[tuple[str, Path]]:
    """``(name, database file)`` of every experiment at ``path``: the store itself if ``path`` is one, else
    each subdirectory holding a results.db and each .db file directly inside ``path``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise StoreError(f"no such file or directory: {p}")
    if p.is_file():
        return [(p.parent.name if p.name == DB_NAME else p.stem, p)]
    if (p / DB_NAME).is_file():
        return [(p.resolve().name, p / DB_NAME)]
    found = [(d.name, d / DB_NAME) for d in sorted(p.iterdir()) if d.is_dir() and (d / DB_NAME).is_file()]
    found += [(f.stem, f) for f in sorted(p.iterdir()) if f.is_file() and f.suffix.lower() in DB_SUFFIXES]
    return found


def short_error(error) -> str:
    """One line of an error: a traceback's last line (the exception), or the message's first line."""
    if not error:
        return ""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]


def _fmt_num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    return "nan" if math.isnan(v) else f"{v:.4g}"


def _fmt_timekeys(tk) -> str:
    if tk is None:
        return "-"
    out = []
    for t in np.asarray(tk, dtype=float).ravel():
        out.append("-" if math.isnan(t) else str(int(t)) if float(t).is_integer() else f"{t:.4g}")
    return ",".join(out) if out else "-"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def print_table(header, rows, numeric, file=None):
    """Rows as aligned columns: numbers right-aligned, text left-aligned."""
    file = file or sys.stdout
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        parts = [str(c).rjust(w) if num else str(c).ljust(w) for c, w, num in zip(cells, widths, numeric)]
        return "  ".join(parts).rstrip()

    print(line(header), file=file)
    for r in rows:
        print(line(r), file=file)


def _parse_where(items, axis_names):
    conds = []
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--where expects AXIS=VALUE, got {item!r}")
        if name not in axis_names:
            raise UsageError(f"--where: no axis {name!r}; the axes are {axis_names}")
        conds.append((name, value))
    return conds


def _matches(label, text: str) -> bool:
    if str(label) == text:
        return True
    if isinstance(label, bool):
        return text.strip().lower() in (("true", "1", "yes") if label else ("false", "0", "no"))
    if _is_number(label):
        try:
            return float(text) == float(label)
        except ValueError:
            return False
    return False


def running_ids(claimed, reported) -> set:
    """The jobs running now, from the ids live drivers hold (``claimed``) and those with a live row
    (``reported``). A driver claims a few jobs ahead of its free workers: where its jobs report progress, a
    claimed job that has not reported is still waiting; where none reports (LIVE_EVERY=0, Ray), every claim
    counts."""
    both = set(claimed) & set(reported)
    return both if both else set(claimed)


def sweep_rows(store: StoreUnion, sweep=None):
    """``(sweep id or None, axis names, [(axes labels dict, record or None)])``: the jobs of a sweep in product
    order, or every stored job when the store has no sweep. A job not stored yet is None (queued); a record of
    status ``running`` where a live driver holds it and it has reported progress (its partial record, with
    ``steps`` and ``max_iter``; where no job reports, every job a live driver holds, with no steps);
    its final status where it ended and its record is on its way (a fused member waiting for its group);
    ``interrupted`` where only a dead driver's partial record is left; ``{"status": "damaged", "error": why}``
    where its row cannot be read."""
    sweep = sweep if sweep is not None else store.latest_sweep()
    if sweep is None:
        records = store.records()
        names = list(dict.fromkeys(n for r in records for n in r.get("axes", {})))
        return None, names, [(r.get("axes", {}), r) for r in records]
    res = store.results(sweep)
    by_key = {res.key(r): r for r in res.records}
    ids = store.sweep_job_ids(sweep)
    claims = {c["job_id"]: c for c in store.live_claims()}
    partial = store.live_records()
    running = running_ids(claims, partial)
    rows = []
    for job_id, key in zip(ids, itertools.product(*res.axis_values)):
        rec = by_key.get(key)
        if rec is None and job_id in store.damaged:
            rec = {"job_id": job_id, "status": "damaged", "error": f"damaged row: {store.damaged[job_id]}"}
        elif rec is None and job_id in running:
            claim = claims[job_id]
            rec = partial.get(job_id, {"job_id": job_id})
            # a fused member that ended: its record comes with its group's, but it runs no more
            rec = {**rec, "status": rec.get("ended") or "running", "device": f"{claim['host']} pid {claim['pid']}"}
        elif rec is None and job_id in partial:  # its driver died (or was stopped) while it ran
            rec = {**partial[job_id], "status": "interrupted"}
        rows.append((dict(zip(res.axis_names, key)), rec))
    return sweep, res.axis_names, rows


def sweep_meta(store: StoreUnion, sweep) -> dict:
    """The meta a sweep was recorded with (command line, time, provenance, fixed hyperparameters), or {}."""
    return next((s["meta"] or {} for s in store.sweeps() if s["id"] == sweep), {}) if sweep is not None else {}


def provenance_lines(meta: dict, records) -> list[str]:
    """What ``show`` prints under the table: where and with what the sweep ran, and the code version of each
    user function (when every job ran the same; otherwise the table has a ``code`` column)."""
    lines = []
    prov = meta.get("provenance")
    if prov:
        git = prov.get("git_commit")
        git = (f"git {git[:12]}{' (dirty)' if prov.get('git_dirty') else ''}" if git else "not in a git repository")
        lines.append(f"ran on {prov.get('host')}: {git}; python {prov.get('python')}, modelscape "
                     f"{prov.get('modelscape')}, torch {prov.get('torch')}, numpy {prov.get('numpy')}")
    codes = {json.dumps(r.get("code"), sort_keys=True) for r in records if r and r.get("code") is not None}
    if len(codes) == 1:
        code = json.loads(codes.pop())
        lines.append("code: " + (", ".join(f"{name} {fp}" for name, fp in code.items()) or "no user functions"))
    return lines


def _code_cell(rec) -> str:
    code = (rec or {}).get("code")
    return " ".join(f"{name.rsplit('.', 1)[-1]}={fp[:8]}" for name, fp in code.items()) if code else "-"


UNSTORED = ("running", "interrupted", "queued")  # what a job a sweep lists and no file holds a record of is


def experiment_counts(store: StoreUnion) -> dict:
    """``{status: jobs}`` of an experiment, as ``show`` tells them: every stored job by its status, and every job
    a sweep lists that is not stored as ``running`` (a live driver holds it), ``interrupted`` (its driver died
    while it ran) or ``queued`` (not started)."""
    stored = store.statuses()
    counts = dict(store.status_counts())
    listed = dict.fromkeys(j for s in store.sweeps() for j in store.sweep_job_ids(s["id"]))
    partial = store.live_records()
    running = running_ids({c["job_id"] for c in store.live_claims()}, partial)
    for job_id in listed:
        if job_id not in stored:
            status = "running" if job_id in running else "interrupted" if job_id in partial else "queued"
            counts[status] = counts.get(status, 0) + 1
    return counts


def cmd_ls(args) -> int:
    stores = find_stores(args.path)
    if not stores:
        raise StoreError(f"no results stores in {Path(args.path).expanduser()} (looked for */{DB_NAME} and *.db)")
    table, bad = [], 0
    for name, db in stores:
        try:
            with StoreUnion(db) as st:
                table.append((name, experiment_counts(st), len(st.sweeps())))
        except StoreError as e:
            bad += 1
            print(f"modelscape: error: {e}", file=sys.stderr)
    if table:
        order = STATUSES + UNSTORED
        statuses = [s for s in order if any(c.get(s) for _, c, _ in table)]
        statuses += sorted({s for _, c, _ in table for s in c} - set(order))
        header = ["experiment", "jobs", *statuses, "sweeps"]
        rows = [[name, sum(c.values()), *[c.get(s, 0) for s in statuses], n] for name, c, n in table]
        print_table(header, rows, [False] + [True] * (len(header) - 1))
    return 1 if bad else 0


def cmd_show(args) -> int:
    with StoreUnion(args.path) as st:
        sweep, names, rows = sweep_rows(st, args.sweep)
        meta = sweep_meta(st, sweep)
        store_dir, store_file = st.path.parent, st.path.name
    footer = provenance_lines(meta, [r for _, r in rows])
    with_ckpt = any(r and r.get("checkpoints") for _, r in rows)
    if with_ckpt:
        from modelscape.backend import checkpoints  # start-up: `show` without checkpoints needs no torch
        footer.append(checkpoints.disk_line(store_dir, store_file) or "")
    several_codes = len({json.dumps(r.get("code"), sort_keys=True) for _, r in rows if r and r.get("code")}) > 1
    conds = _parse_where(args.where, names)
    wanted = set(args.status or ())
    if "pending" in wanted:  # the name before running and queued were told apart: every job not finished
        wanted |= {"queued", "running", "interrupted"}
    out, numeric_axis = [], {n: True for n in names}
    for axes, rec in rows:
        status = rec["status"] if rec is not None else "queued"
        if wanted and status not in wanted:
            continue
        if not all(_matches(axes.get(n), v) for n, v in conds):
            continue
        for n in names:
            numeric_axis[n] &= _is_number(axes.get(n))
        rec = rec or {}
        wall = rec.get("wall_time")
        out.append([*[str(axes.get(n, "-")) for n in names], status, _fmt_timekeys(rec.get("timekeys")),
                    _fmt_num(rec.get("train_loss")), _fmt_num(rec.get("test_loss")), _fmt_steps(rec),
                    f"{wall:.2f}s" if _is_number(wall) else "-", *([_code_cell(rec)] if several_codes else []),
                    *([checkpoints.record_cell(rec)] if with_ckpt else []),
                    short_error(rec.get("error")) if status in NO_RESULT + ("damaged",) else ""])
    if not out:
        print("no jobs match" + (f" in sweep {sweep}" if sweep is not None else ""), file=sys.stderr)
        return 0
    header = [*names, "status", "timekeys", "train_loss", "test_loss", "steps", "wall_time",
              *(["code"] if several_codes else []), *(["checkpoints"] if with_ckpt else []), "error"]
    numeric = [numeric_axis[n] for n in names] + [False, False, True, True, True, True] + [False] * (
        1 + several_codes + with_ckpt)
    if not any(r[-1] for r in out):  # no failed job shown: drop the empty error column
        header, numeric, out = header[:-1], numeric[:-1], [r[:-1] for r in out]
    print_table(header, out, numeric)
    if footer:
        print()
        print("\n".join(footer))
    return 0


def _fmt_steps(rec) -> str:
    """Steps done: ``340/1000`` (of MAX_ITER) for a running or interrupted job, the count for a finished one."""
    if rec.get("max_iter") is not None and rec.get("status") in ("running", "interrupted"):
        return f"{rec.get('steps', 0)}/{rec['max_iter']}"
    return _fmt_num(rec.get("steps"))


# --- watch ------------------------------------------------------------------------------------------------

def _fmt_elapsed(seconds) -> str:
    if not _is_number(seconds) or math.isnan(seconds):
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def watch_view(store: StoreUnion, sweep=None, name: str = "", max_rows: int | None = None) -> tuple[str, dict]:
    """``(text, counts)``: what ``modelscape watch`` prints once, a line of counts (running, queued, done,
    failed) and one row per running job (axes, steps/MAX_ITER, EMA train loss, last test loss, elapsed), at
    most ``max_rows`` of them (then a line saying how many more run)."""
    sweep, names, rows = sweep_rows(store, sweep)
    counts = {"running": 0, "queued": 0, "done": 0, "failed": 0}
    table = []
    for axes, rec in rows:
        status = "queued" if rec is None or rec["status"] == "interrupted" else rec["status"]
        key = ("failed" if status in NO_RESULT + ("damaged",) else status if status in counts else "done")
        counts[key] += 1
        if status == "running":
            steps, top = rec.get("steps"), rec.get("max_iter")
            done = f"{steps}/{top}" if top else "-"
            pct = f"{100 * steps / top:.0f}%" if top else "-"
            table.append([*[str(axes.get(n, "-")) for n in names], done, pct, _fmt_num(rec.get("train_loss")),
                          _fmt_num(rec.get("test_loss")), _fmt_elapsed(rec.get("wall_time"))])
    title = f"{name} sweep {sweep}" if sweep is not None else name
    head = (f"{title}: {len(rows)} jobs | {counts['running']} running, {counts['queued']} queued, "
            f"{counts['done']} done, {counts['failed']} failed | {time.strftime('%H:%M:%S')}")
    if not table:
        return head, counts
    more = len(table) - max_rows if max_rows is not None and len(table) > max_rows else 0
    buf = io.StringIO()
    numeric = [all(_is_number(axes.get(n)) for axes, _ in rows) for n in names]
    print_table([*names, "steps", "%", "train (ema)", "test", "elapsed"], table[:len(table) - more],
                numeric + [True] * 5, file=buf)
    tail = f"\n... and {more} more running" if more else ""
    return head + "\n\n" + buf.getvalue().rstrip("\n") + tail, counts


def cmd_watch(args) -> int:
    """Print the running jobs of a sweep every ``--every`` seconds until nothing runs (Ctrl-C: exit 0)."""
    if not args.every > 0:
        raise UsageError(f"--every must be a positive number of seconds, got {args.every}")
    name = find_stores(args.path)[0][0] if Path(args.path).expanduser().exists() else str(args.path)
    tty = sys.stdout.isatty()
    idle = 0
    try:
        while True:
            # a terminal shows as many rows as fit (the header, a blank line, the column titles, "... more")
            max_rows = max(1, shutil.get_terminal_size().lines - 5) if tty else None
            with StoreUnion(args.path) as st:  # opened afresh: an array task may have added its shard file
                text, counts = watch_view(st, args.sweep, name, max_rows)
            if tty:
                sys.stdout.write("\x1b[H\x1b[J")  # redraw in place
            print(text + ("" if tty else "\n"), flush=True)
            # nothing runs: done if nothing is left either, else give a driver between jobs a few looks
            idle = idle + 1 if counts["running"] == 0 else 0
            if idle and (counts["queued"] == 0 or idle >= WATCH_IDLE_LOOKS):
                return 0
            time.sleep(args.every)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 0


def cmd_export(args) -> int:
    if args.csv:
        return _export_csv(args)
    return _export_netcdf(args)


def _export_csv(args) -> int:
    with StoreUnion(args.path) as st:
        _, names, rows = sweep_rows(st, args.sweep)
    recs = [(axes, r) for axes, r in rows if r is not None]
    if not recs:
        raise StoreError(f"nothing to export: no jobs stored in {args.path}")
    tk_names, timekeys = timekey_columns([r for _, r in recs])
    nan_row = [float("nan")] * len(tk_names)
    scalars = [s for s in SCALARS if s not in names]
    header = ["job_id", *names, "status", *scalars, *tk_names, "error"]
    with open(args.csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for axes, r in recs:
            w.writerow([r["job_id"], *[axes.get(n, "") for n in names], r["status"],
                        *["" if r.get(s) is None else r[s] for s in scalars], *timekeys.get(r["job_id"], nan_row),
                        short_error(r.get("error"))])
    print(f"wrote {len(recs)} jobs to {args.csv}", file=sys.stderr)
    return 0


def timekey_columns(records) -> tuple[list, dict]:
    """``(names, {job id: timekeys})``: the CSV's timekey columns, one per threshold, named by its value as given
    (``timekey_0.1``; a fraction of the initial loss under RELATIVE_THRESHOLDS), as ``to_xarray``'s
    ``threshold`` coordinate holds them, and each job's timekeys on them (NaN at a threshold it was not given).
    Jobs without timekeys (failed ones) are not in the dict."""
    have = [r for r in records if r.get("timekeys") is not None and np.size(r["timekeys"])
            and r.get("thresholds_given", r.get("thresholds")) is not None]
    if not have:
        return [], {}
    labels, slots = threshold_grid(have)
    values = {}
    for r, where in zip(have, slots):
        row = np.full(len(labels), np.nan)
        row[where] = np.asarray(r["timekeys"], dtype=float).ravel()
        values[r["job_id"]] = row.tolist()
    return [f"timekey_{float(v):.15g}" for v in labels], values


def netcdf_engine() -> str | None:
    """The first netCDF engine xarray can use here (netcdf4, h5netcdf, scipy), or None."""
    for module, engine in NETCDF_ENGINES:
        if importlib.util.find_spec(module) is not None:
            return engine
    return None


def _export_netcdf(args) -> int:
    engine = netcdf_engine()
    if engine is None:
        print("modelscape: error: writing netCDF needs one of the packages netCDF4, h5netcdf or scipy, and none "
              "is installed; run `pip install scipy` (or export --csv)", file=sys.stderr)
        return 1
    with StoreUnion(args.path) as st:
        sweep = args.sweep if args.sweep is not None else st.latest_sweep()
        if sweep is None:
            raise StoreError(f"{st.path} holds no recorded sweep; netCDF export needs one (try --csv)")
        res = st.results(sweep)
        meta = sweep_meta(st, sweep)
    try:
        ds = res.to_xarray().copy()
        ds.attrs.update(netcdf_attrs(sweep, meta))
        ds.to_netcdf(args.netcdf, engine=engine)
    except (ValueError, TypeError) as e:
        print(f"modelscape: error: cannot write {args.netcdf} as netCDF ({engine}): {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(res.records)} jobs to {args.netcdf}", file=sys.stderr)
    return 0


def netcdf_attrs(sweep: int, meta: dict) -> dict:
    """A sweep's provenance (``host``, ``git_commit``, ``torch`` ...) and fixed hyperparameters (``hp_LR`` ...) as
    netCDF attributes: numbers stay numbers, lists of numbers become arrays, anything else a string."""
    def value(v):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v
        if isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            return np.asarray(v)
        return v if isinstance(v, str) else json.dumps(v)

    attrs = {"sweep": sweep, "argv": json.dumps(meta.get("argv"))}
    attrs.update({k: value(v) for k, v in (meta.get("provenance") or {}).items()})
    attrs.update({f"hp_{k}": value(v) for k, v in (meta.get("fixed") or {}).items()})
    return attrs


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``modelscape`` command."""
    p = argparse.ArgumentParser(prog="modelscape", description="Look inside modelscape results stores.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    path_help = "a results directory, an experiment directory, or its results.db"

    ls = sub.add_parser("ls", help="experiments and their jobs by status (running and queued ones too)")
    ls.add_argument("path", metavar="PATH", help=path_help)
    ls.set_defaults(func=cmd_ls)

    show = sub.add_parser("show", help="a table of a sweep's jobs")
    show.add_argument("path", metavar="PATH", help="an experiment directory or its results.db")
    show.add_argument("--status", action="append", metavar="S",
                      help=f"only jobs with this status ({', '.join(STATUSES)}, running, queued, interrupted, "
                      "damaged; pending = not finished); repeatable")
    show.add_argument("--where", action="append", metavar="AXIS=VALUE", help="only jobs with this axis value; "
                      "repeatable (all must hold)")
    show.add_argument("--sweep", type=int, metavar="N", help="sweep id (default: the latest)")
    show.set_defaults(func=cmd_show)

    watch = sub.add_parser("watch", help="a live table of a sweep's running jobs, refreshed until none runs")
    watch.add_argument("path", metavar="PATH", help="an experiment directory or its results.db")
    watch.add_argument("--every", type=float, default=2.0, metavar="S", help="seconds between refreshes "
                       "(default 2)")
    watch.add_argument("--sweep", type=int, metavar="N", help="sweep id (default: the latest)")
    watch.set_defaults(func=cmd_watch)

    ex = sub.add_parser("export", help="write a sweep as CSV (one row per job) or netCDF (xarray)")
    ex.add_argument("path", metavar="PATH", help="an experiment directory or its results.db")
    fmt = ex.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--csv", metavar="FILE")
    fmt.add_argument("--netcdf", metavar="FILE")
    ex.add_argument("--sweep", type=int, metavar="N", help="sweep id (default: the latest)")
    ex.set_defaults(func=cmd_export)
    return p


def main(argv=None) -> int:
    """Run the ``modelscape`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"modelscape {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `modelscape show ... | head`: the reader left, which is fine
        sys.stderr.close()
        return 0
    except (StoreError, OSError) as e:
        print(f"modelscape: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
