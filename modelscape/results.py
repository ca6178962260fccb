"""Sweep results addressed by axis names: an ExptTrace-style view and an ``xarray.Dataset``.

A sweep's records (one plain dict per job, see ``modelscape.backend.job.run_config``) become
``SweepResults``: ``res["timekeys"].get(WIDTH=256)`` returns an array over the remaining axes, and
``res.to_xarray()`` a Dataset with one dimension per sweep axis. Jobs that failed or never ran are NaN there.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np

from modelscape.transfer import best_over_trials

__all__ = ["SweepResults", "ExptTrace", "axis_label", "threshold_grid", "NO_RESULT", "SCALAR_FIELDS"]

SCALAR_FIELDS = ("train_loss", "test_loss", "steps", "wall_time")
# Statuses of a job that gave no numbers: it raised, killed its worker twice, or ran past JOB_TIMEOUT.
NO_RESULT = ("failed", "crashed", "timeout")


def axis_label(v):
    """The coordinate label of an axis value: numbers, strings and bools as they are, anything else as str."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    return str(v)  # np.str_ included: labels compare and print as plain strings


class ExptTrace(dict):
    """Values keyed by one value per axis (the seed's ``ExptTrace``), read back as arrays by axis name.

    ``trace[(256, 0)]`` is one job's value; ``trace.get(WIDTH=256)`` stacks the values over the axes not named
    (in axis order, values sorted), NaN-padding ragged curves and masking missing jobs (``np.ma``).

    The object is also, as a dict, expt-core's serialized layout: ``trace["var_names"]``,
    ``trace["config2outcome"]`` ({axis-value tuple: value}) and ``trace["outcome_shape"]``, so the original's
    analysis code (``ExptTrace.deserialize(res["losses"])`` from expt-core, or reading ``config2outcome``)
    takes it as it is. Those three string keys always mean the layout, never an axis value.
    """

    LAYOUT = ("var_names", "config2outcome", "outcome_shape")

    def __init__(self, var_names, axis_values=None):
        if "val" in var_names:
            raise ValueError("an axis may not be called 'val'")
        super().__init__(var_names=list(var_names), config2outcome={}, outcome_shape=None)
        # Values each axis is known to take even where nothing is stored (a sweep's failed jobs): they
        # appear, masked, in ``get``.
        self.axis_values = {n: [axis_label(v) for v in vals] for n, vals in dict(axis_values or {}).items()}

    @property
    def var_names(self) -> list:
        return dict.__getitem__(self, "var_names")

    @property
    def vals(self) -> dict:
        """``{axis-value tuple: value}`` (expt-core's ``config2outcome``)."""
        return dict.__getitem__(self, "config2outcome")

    @vals.setter
    def vals(self, value):
        dict.__setitem__(self, "config2outcome", value)

    @property
    def valshape(self):
        """The shape of the values (expt-core's ``outcome_shape``)."""
        return dict.__getitem__(self, "outcome_shape")

    @valshape.setter
    def valshape(self, value):
        dict.__setitem__(self, "outcome_shape", value)

    def _key(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if len(key) != len(self.var_names):
            raise KeyError(f"key {key} has {len(key)} values but the axes are {self.var_names}")
        return tuple(k if isinstance(k, slice) else axis_label(k) for k in key)

    def __setitem__(self, key, val):
        if isinstance(key, str) and key in self.LAYOUT:
            dict.__setitem__(self, key, val)  # the layout itself (unpickling sets it this way)
            return
        key = self._key(key)
        if self.valshape is None:
            self.valshape = np.shape(val)
        self.vals[key] = val

    def __getitem__(self, key):
        if isinstance(key, str) and key in self.LAYOUT:
            return dict.__getitem__(self, key)
        key = self._key(key)
        extents = [self.get_axis(n) if isinstance(k, slice) else [k] for n, k in zip(self.var_names, key)]
        if all(len(e) == 1 for e in extents) and not any(isinstance(k, slice) for k in key):
            if key not in self.vals:
                raise KeyError(f"no value for {dict(zip(self.var_names, key))}")
            return self.vals[key]
        return self._stack(extents, squeeze=[not isinstance(k, slice) for k in key])

    def _stack(self, extents, squeeze):
        text = _is_text(self.vals.values())
        present = [_values(v, text) for v in self.vals.values() if v is not None]
        inner = _common_shape([np.shape(v) for v in present])
        fill, dtype = _fill(present, text)
        out = np.full([len(e) for e in extents] + list(inner), fill, dtype=dtype)
        mask = np.ones(out.shape, dtype=bool)
        for idx in itertools.product(*[range(len(e)) for e in extents]):
            key = tuple(e[i] for e, i in zip(extents, idx))
            v = self.vals.get(key)
            if v is None:
                continue
            v = _values(v, text)
            sl = idx + tuple(slice(0, s) for s in np.shape(v))
            out[sl] = v
            mask[idx] = False
        out = np.ma.masked_array(out, mask=mask if text else mask | np.isnan(out))
        drop = tuple(i for i, s in enumerate(squeeze) if s)
        return out.reshape([s for i, s in enumerate(out.shape) if i not in drop])

    def get_axis(self, var_name):
        """The sorted values that axis ``var_name`` takes among the stored keys (and the declared axis values)."""
        if var_name not in self.var_names:
            raise KeyError(f"no axis {var_name!r}; the axes are {self.var_names}")
        i = self.var_names.index(var_name)
        return sorted({k[i] for k in self.vals} | set(self.axis_values.get(var_name, ())), key=_sort_key)

    def get(self, *key, **kwargs):
        """Values with the named axes fixed, as an array over the other axes (missing entries masked).

        With a positional key it is ``dict.get`` on the layout (``trace.get("config2outcome", {})``)."""
        if key:
            return dict.get(self, *key)
        unknown = set(kwargs) - set(self.var_names)
        if unknown:
            raise KeyError(f"no axis {sorted(unknown)}; the axes are {self.var_names}")
        return self[tuple(kwargs.get(n, slice(None)) for n in self.var_names)]

    def is_written(self, **kwargs):
        """Whether a value is stored for this full set of axis values."""
        return self._key(tuple(kwargs[n] for n in self.var_names)) in self.vals

    def serialize(self):
        """A plain dict in expt-core's layout (var_names, config2outcome, outcome_shape) plus axis_values."""
        return {"var_names": list(self.var_names), "config2outcome": dict(self.vals), "outcome_shape": self.valshape,
                "axis_values": dict(self.axis_values)}

    @classmethod
    def deserialize(cls, data):
        """Inverse of ``serialize``; also reads expt-core's layout and this package's earlier one (vals,
        valshape). An ExptTrace is passed through."""
        if isinstance(data, ExptTrace):
            return data
        obj = cls(data["var_names"], data.get("axis_values"))
        obj.vals = dict(data["config2outcome"] if "config2outcome" in data else data["vals"])
        obj.valshape = data["outcome_shape"] if "outcome_shape" in data else data["valshape"]
        return obj

    def __repr__(self):
        return f"ExptTrace(var_names={self.var_names}, {len(self.vals)} values of shape {self.valshape})"


def _is_text(values) -> bool:
    """Whether any of ``values`` (grab values) is a string or an array of strings."""
    return any(v is not None and np.asarray(v).dtype.kind in "US" for v in values)


def _values(v, text: bool) -> np.ndarray:
    """A value as an array of floats, or of strings for a string-valued grab."""
    return np.asarray(v).astype(str) if text else np.asarray(v, dtype=float)


def _fill(arrays, text: bool):
    """``(fill value, dtype)`` of an array gathering ``arrays``: NaN and float, or "" and the longest string dtype."""
    return ("", np.result_type(*[a.dtype for a in arrays], np.str_)) if text else (np.nan, float)


def _sort_key(v):
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def _common_shape(shapes):
    if not shapes:
        return ()
    nd = {len(s) for s in shapes}
    if len(nd) > 1:
        raise ValueError(f"values have different numbers of dimensions: {sorted(set(shapes))}")
    return tuple(max(s[i] for s in shapes) for i in range(nd.pop()))


def _grab_labels(name, records, ndim):
    """``(dims, coords, places)`` of a grab whose values came labelled (``record["grab_dims"]``) in every record
    that has it, else None: the union of each dimension's labels in first-seen order, and for each record the
    positions of its labels along each dimension (jobs of different depths name different layers)."""
    specs = [(r.get("grab_dims") or {}).get(name) for r in records]
    if not specs or any(sp is None for sp in specs) or any(len(sp["dims"]) != ndim for sp in specs):
        return None
    dims = list(specs[0]["dims"])
    if any(list(sp["dims"]) != dims for sp in specs):
        return None
    coords = {}
    for d in dims:
        union = []
        for sp in specs:
            for lab in sp["coords"].get(d, []):
                if lab not in union:
                    union.append(lab)
        coords[d] = union
    places = []
    for sp in specs:
        index = [{lab: k for k, lab in enumerate(coords[d])} for d in dims]
        places.append(tuple([index[k][lab] for lab in sp["coords"].get(d, [])] for k, d in enumerate(dims)))
    return dims, coords, places


def threshold_grid(records) -> tuple[np.ndarray, list]:
    """The ``threshold`` coordinate of ``records`` (each with timekeys) and each record's positions on it.

    A record's labels are its thresholds as given (``thresholds_given``; ``thresholds`` in records stored before
    there was one). When every record has the same labels, they are the coordinate, in their order (the order of
    ``timekeys``); otherwise (jobs given different thresholds) the coordinate is the union of the labels, largest
    first (the order a falling loss crosses them), and a job is NaN at a threshold it was not given.
    """
    labels = [np.asarray(r.get("thresholds_given", r["thresholds"]), dtype=float).ravel() for r in records]
    if all(len(lab) == len(labels[0]) and np.array_equal(lab, labels[0]) for lab in labels):
        return labels[0], [slice(0, len(labels[0]))] * len(labels)
    union = np.array(sorted(set(np.concatenate(labels).tolist()), reverse=True))
    return union, [np.searchsorted(-union, -lab) for lab in labels]


class SweepResults(Mapping):
    """The results of a sweep: its axes, one record per job, and labelled views of them.

    As a mapping it offers the seed's keys: ``jobs``, ``var_axes``, ``losses`` (test loss: final, or the
    test curve), ``train_losses``, ``timekeys`` and ``extras`` ({grab: trace}); each trace is an ExptTrace.
    """

    KEYS = ("jobs", "var_axes", "losses", "train_losses", "timekeys", "extras")

    def __init__(self, axis_names, axis_values, records, store_dir=None):
        self.axis_names = list(axis_names)
        self.axis_values = [list(v) for v in axis_values]
        self.records = list(records)
        self.store_dir = store_dir  # the experiment directory of the store the records come from, if any
        self._xr = None

    # --- the seed's dict ---------------------------------------------------------------------------
    def __getitem__(self, key):
        if key == "jobs":
            return list(itertools.product(*self.axis_values))
        if key == "var_axes":
            return list(self.axis_names)
        if key == "losses":
            return self.trace(lambda r: r.get("test_curve", r["test_loss"]))
        if key == "train_losses":
            return self.trace(lambda r: r.get("train_curve", r["train_loss"]))
        if key == "timekeys":
            return self.trace(lambda r: r["timekeys"])
        if key == "extras":
            return {name: self.trace(lambda r, n=name: r["grabs"].get(n)) for name in self.grab_names}
        raise KeyError(f"{key!r}; the keys are {list(self.KEYS)}")

    def __iter__(self):
        return iter(self.KEYS)

    def __len__(self):
        return len(self.KEYS)

    def key(self, record) -> tuple:
        """The tuple of axis labels of a record."""
        return tuple(axis_label(record["axes"][n]) for n in self.axis_names)

    def trace(self, fn) -> ExptTrace:
        """An ExptTrace of ``fn(record)`` over the jobs that did not fail (the others masked in ``get``).

        Arrays of different lengths (loss curves of jobs that stopped at different steps) are NaN-padded to a
        common shape, so every value has the trace's ``outcome_shape`` as expt-core expects."""
        t = ExptTrace(self.axis_names, dict(zip(self.axis_names, self.axis_values)))
        values = {self.key(r): fn(r) for r in self.records if r["status"] not in NO_RESULT}
        values = {k: v for k, v in values.items() if v is not None}
        arrays = [v for v in values.values() if isinstance(v, np.ndarray) and v.dtype.kind in "fiub"]
        shapes = {v.shape for v in arrays}
        if len(shapes) > 1 and len({len(s) for s in shapes}) == 1:
            common = _common_shape(list(shapes))
            for k, v in values.items():
                if isinstance(v, np.ndarray) and v.shape != common:
                    padded = np.full(common, np.nan)
                    padded[tuple(slice(0, n) for n in v.shape)] = v
                    values[k] = padded
        for k, v in values.items():
            t[k] = v
        return t

    @property
    def grab_names(self):
        names = []
        for r in self.records:
            for n in (r.get("grabs") or {}):
                if n not in names:
                    names.append(n)
        return names

    def record(self, **axes) -> dict:
        """The record of the job with these axis values (an axis with one value may be left out); KeyError naming
        the axes and the values they take when there is no such job."""
        unknown = set(axes) - set(self.axis_names)
        if unknown:
            raise KeyError(f"no axis {sorted(unknown)}; the axes are {self.axis_names}")
        values = dict(zip(self.axis_names, self.axis_values))
        unset = [n for n in self.axis_names if n not in axes and len(values[n]) > 1]
        if unset:
            raise KeyError(f"give a value for axis {', '.join(unset)}: "
                           + "; ".join(f"{n} takes {values[n]}" for n in unset))
        key = tuple(axis_label(axes[n]) if n in axes else axis_label(values[n][0]) for n in self.axis_names)
        for r in self.records:
            if self.key(r) == key:
                return r
        taken = "; ".join(f"{n} takes {values[n]}" for n in self.axis_names)
        raise KeyError(f"no stored job with {dict(zip(self.axis_names, key))} in this sweep ({taken})")

    def status_counts(self) -> dict:
        """``{status: number of jobs}``."""
        counts = {}
        for r in self.records:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        return counts

    def failed(self) -> list:
        """Records of the jobs that gave no result: ``failed`` (``error`` holds the traceback), ``crashed``
        and ``timeout`` (``error`` says how the worker ended)."""
        return [r for r in self.records if r["status"] in NO_RESULT]

    def get(self, var="test_loss", **sel):
        """``to_xarray()[var].sel(**sel)`` as a DataArray (``get('timekeys', WIDTH=256, threshold=0.1)``): ``sel``
        names sweep axes or the variable's other coordinates (``threshold``, ``step``, ``eval_step``)."""
        ds = self.to_xarray()
        if var not in ds:
            raise KeyError(f"no variable {var!r}; there are {sorted(ds.data_vars)}")
        unknown = set(sel) - set(self.axis_names) - set(ds[var].coords)
        if unknown:
            raise KeyError(f"no axis {sorted(unknown)}; the axes are {self.axis_names}")
        return ds[var].sel(**{k: axis_label(v) for k, v in sel.items()})

    def best(self, axis: str = "LR", metric: str = "train_loss", trial: str = "trial", maximize: bool = False,
             log_x: bool | None = None, n_boot: int = 200, **sel):
        """The best value of ``axis`` (a learning rate, a multiplier) for each combination of the other sweep axes,
        read from a parabola fitted around the minimum of ``metric`` (see ``modelscape.transfer``), with its
        uncertainty over trials.

        ``metric``: a per-job number (``train_loss``, ``test_loss``, a scalar grab by its name); ``maximize`` for an
        accuracy. Diverged, failed and missing jobs are left out of the fit. ``trial``: the axis bootstrapped for
        the uncertainty (absent: one trial). ``log_x``: fit in log2 of ``axis`` (default: when all its values are
        positive). ``sel`` fixes other axes. Returns an ``xarray.Dataset`` over the remaining axes: ``best`` (the
        optimum of ``axis``), ``fitted`` (``metric`` there), ``octaves`` (standard deviation of log2(best) over
        ``n_boot`` bootstrap resamples of the trials; ``std``, in the axis' units, without ``log_x``), ``at_edge`` (the grid minimum is the smallest or largest
        value tried: the optimum may lie beyond the grid).
        """
        import xarray as xr  # worker start-up: workers import this module, never xarray

        ds = self.to_xarray()
        var = metric if metric in ds else f"grab_{metric}"
        if var not in ds:
            raise KeyError(f"no variable {metric!r}; there are {sorted(v for v in ds.data_vars if v != 'status')}")
        if axis not in self.axis_names:
            raise KeyError(f"best: no sweep axis {axis!r}; the axes are {self.axis_names}")
        unknown = set(sel) - set(self.axis_names)
        if unknown:
            raise KeyError(f"no axis {sorted(unknown)}; the axes are {self.axis_names}")
        da = ds[var].where(~ds["status"].isin(["diverged", "missing", *NO_RESULT]))
        da = da.sel({k: axis_label(v) for k, v in sel.items()})
        extra = [d for d in da.dims if d not in self.axis_names]
        if extra:
            raise ValueError(f"{var} has dimensions {extra} besides the sweep axes: best needs a number per job")
        if maximize:
            da = -da
        x = np.asarray(da[axis].values)
        if not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in x.tolist()):
            raise TypeError(f"best: axis {axis!r} must hold numbers, got {x.tolist()}")
        log_x = bool((x.astype(float) > 0).all()) if log_x is None else log_x
        others = [d for d in da.dims if d not in (axis, trial)]
        shape = [da.sizes[d] for d in others]
        spread = "octaves" if log_x else "std"
        out = {k: np.full(shape, np.nan) for k in ("best", "fitted", spread)}
        out["at_edge"] = np.zeros(shape, dtype=bool)
        for idx in itertools.product(*[range(n) for n in shape]):
            sub = da.isel(dict(zip(others, idx)))
            y = sub.transpose(*([trial] if trial in sub.dims else []), axis).values
            fit = best_over_trials(x.astype(float), y, log_x=log_x, log_y=not maximize, n_boot=n_boot)
            out["best"][idx], out[spread][idx], out["at_edge"][idx] = fit["x"], fit["std"], fit["at_edge"]
            out["fitted"][idx] = -fit["y"] if maximize else fit["y"]
        coords = {d: da[d].values for d in others}
        return xr.Dataset({k: (others, v) for k, v in out.items()}, coords=coords,
                          attrs={"axis": axis, "metric": metric, "log_x": log_x})

    # --- xarray --------------------------------------------------------------------------------------
    def to_xarray(self):
        """An ``xarray.Dataset`` with one dimension per sweep axis (coordinates = axis labels).

        Variables: status, steps, wall_time, train_loss, test_loss; timekeys and thresholds (the losses to reach)
        along ``threshold``, a coordinate holding the thresholds as given (LOSS_CHECKPOINTS: fractions of the first
        loss under RELATIVE_THRESHOLDS; see ``threshold_grid``), so ``timekeys.sel(threshold=0.1)`` works. With
        curves, every job is on one step grid: train_curve and train_raw along ``step`` (0 .. the longest job's
        last step; entry ``k`` is step ``k``'s loss), test_curve along ``eval_step`` (the union of all jobs'
        evaluation steps); a job's values sit at its own steps, so a job that stopped early is NaN after its last
        step, never shifted. NaN also marks an evaluation step a job did not have (another job's last step, off
        the EVAL_EVERY grid). One ``grab_<name>`` per grab, along ``eval_step`` with curves (strings for a grab
        that returns strings, "" where missing). Missing and failed jobs are NaN.
        """
        if self._xr is not None:
            return self._xr
        import xarray as xr  # worker start-up: workers import this module, never xarray

        coords = {n: [axis_label(v) for v in vals] for n, vals in zip(self.axis_names, self.axis_values)}
        for n, labels in coords.items():
            if len(set(labels)) != len(labels):
                raise ValueError(f"axis {n!r} has repeated values {labels}")
        index = {n: {lab: i for i, lab in enumerate(labels)} for n, labels in coords.items()}
        shape = [len(coords[n]) for n in self.axis_names]
        recs = [(tuple(index[n][k] for n, k in zip(self.axis_names, self.key(r))), r) for r in self.records]
        ok = [(i, r) for i, r in recs if r["status"] not in NO_RESULT]
        dims = list(self.axis_names)
        data = {}

        status = np.full(shape, "missing", dtype=object)
        for i, r in recs:
            status[i] = r["status"]
        data["status"] = (dims, status.astype(str))
        for f in SCALAR_FIELDS:
            arr = np.full(shape, np.nan)
            for i, r in (recs if f == "wall_time" else ok):  # a failed job has no steps or losses: NaN
                arr[i] = r.get(f, np.nan)
            data[f] = (dims, arr)

        extra_coords = {}
        with_thresholds = [(i, r) for i, r in ok if r.get("timekeys") is not None and len(r["timekeys"])]
        if with_thresholds:
            labels, slots = threshold_grid([r for _, r in with_thresholds])
            for f in ("timekeys", "thresholds"):
                arr = np.full(shape + [len(labels)], np.nan)
                for (i, r), where in zip(with_thresholds, slots):
                    arr[i][where] = r[f]
                data[f] = (dims + ["threshold"], arr)
            extra_coords["threshold"] = labels

        curves = [(i, r) for i, r in ok if r.get("train_curve") is not None]
        if curves:
            n_steps = max(len(r["train_curve"]) for _, r in curves)
            for f in ("train_curve", "train_raw"):
                arr = np.full(shape + [n_steps], np.nan)
                for i, r in curves:
                    arr[i][: len(r[f])] = r[f]
                data[f] = (dims + ["step"], arr)
            eval_steps = sorted({int(s) for _, r in curves for s in r["eval_steps"]})
            pos = {s: k for k, s in enumerate(eval_steps)}
            arr = np.full(shape + [len(eval_steps)], np.nan)
            for i, r in curves:
                arr[i][[pos[int(s)] for s in r["eval_steps"]]] = r["test_curve"]
            data["test_curve"] = (dims + ["eval_step"], arr)
            extra_coords.update(step=np.arange(n_steps), eval_step=np.asarray(eval_steps))

        for name in self.grab_names:
            raw = [(i, r, r["grabs"][name]) for i, r in ok if name in (r.get("grabs") or {})]
            # a string grab becomes a variable of strings ("" where a job has none); never a float conversion
            text = _is_text(v for _, _, v in raw)
            vals = [(i, r, _values(v, text)) for i, r, v in raw]
            fill, dtype = _fill([v for _, _, v in vals], text)
            along = curves and all(r.get("eval_steps") is not None for _, r, _ in vals)
            inner_shapes = [v.shape[1:] if along else v.shape for _, _, v in vals]
            inner = _common_shape(inner_shapes)
            gdims = [f"{name}_dim{k}" for k in range(len(inner))]
            # a grab that returned labelled arrays (utils.Labelled): its dims by name, entries placed by label
            labelled = _grab_labels(name, [r for _, r, _ in vals], len(inner))
            if labelled is not None:
                gdims, gcoords, places = labelled
                inner = [len(gcoords[d]) for d in gdims]
                extra_coords.update(gcoords)
            else:
                places = [tuple(slice(0, n) for n in (v.shape[1:] if along else v.shape)) for _, _, v in vals]
            if along:
                arr = np.full(shape + [len(extra_coords["eval_step"])] + list(inner), fill, dtype=dtype)
                for (i, r, v), place in zip(vals, places):
                    rows = [pos[int(s)] for s in r["eval_steps"]]
                    arr[i][np.ix_(rows, *place) if labelled else (rows,) + place] = v
                data[f"grab_{name}"] = (dims + ["eval_step"] + gdims, arr)
            else:
                arr = np.full(shape + list(inner), fill, dtype=dtype)
                for (i, r, v), place in zip(vals, places):
                    if labelled:
                        arr[i][np.ix_(*place)] = v
                    else:  # arr[i] of a scalar grab is a number, not a view: index in one go
                        arr[i + place] = v
                data[f"grab_{name}"] = (dims + gdims, arr)

        self._xr = xr.Dataset(data, coords={**coords, **extra_coords})
        return self._xr

    def __repr__(self):
        return (f"SweepResults(axes={dict(zip(self.axis_names, self.axis_values))}, "
                f"jobs={len(self.records)}, status={self.status_counts()})")
