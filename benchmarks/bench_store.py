"""Cost of the results store: ms per job written, database size, and the time to load a sweep into xarray.

    python benchmarks/bench_store.py [--jobs 100] [--steps 10000] [--evals 100] [--grab-mb 0] [--dir DIR]

Each job has loss curves of ``--steps`` steps (train_curve, train_raw), a test curve at ``--evals`` evaluation
steps, and a small grab (4x4 per evaluation); ``--grab-mb`` adds a grab of that many MB per job (stacked
along the evaluations, as the trainloop records grabs). The baseline
is ``np.save`` of the same arrays into an in-memory buffer: the least any persistent format must pay.
"""
import argparse
import io
import os
import statistics
import tempfile
import time

import numpy as np

from modelscape.backend.store import Store, job_identity, load


def make_record(i, steps, evals, grab_mb):
    rng = np.random.default_rng(i)
    eval_steps = np.linspace(0, steps, evals, dtype=np.int64)
    grabs = {"weight_norms": rng.standard_normal((evals, 4, 4))}
    if grab_mb:
        grabs["big"] = rng.standard_normal((evals, int(grab_mb * 2 ** 20 / 8 / evals)))  # stacked along evals
    w, lr = 2 ** (4 + i % 10), 10.0 ** -(i // 10)
    return dict(job_id=f"{i:064x}", axes={"WIDTH": w, "LR": lr}, status="done", error=None,
                config={"WIDTH": w, "LR": lr, "MAX_ITER": steps, "LOSS_CHECKPOINTS": [0.1, 0.01]},
                steps=steps, thresholds=np.array([0.1, 0.01]), timekeys=np.array([steps / 4, np.nan]),
                train_loss=0.05, test_loss=0.06,
                train_curve=np.exp(-np.arange(steps) / 3000) + rng.random(steps) * 1e-3,
                train_raw=rng.random(steps), eval_steps=eval_steps, test_curve=rng.random(evals), grabs=grabs,
                device="cpu", seed=42, trial=0, wall_time=1.0)


def arrays_of(rec):
    out = [v for v in rec.values() if isinstance(v, np.ndarray)]
    return out + list(rec["grabs"].values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=100)
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--evals", type=int, default=100)
    p.add_argument("--grab-mb", type=float, default=0.0)
    p.add_argument("--dir", help="where to put the store (default: a temporary directory)")
    args = p.parse_args(argv)

    import xarray  # noqa: F401  (imported up front: the load time below is the store's, not xarray's import)

    records = [make_record(i, args.steps, args.evals, args.grab_mb) for i in range(args.jobs)]
    n_bytes = sum(a.nbytes for a in arrays_of(records[0]))

    base = []
    for rec in records:
        t0 = time.perf_counter()
        for a in arrays_of(rec):
            np.save(io.BytesIO(), a, allow_pickle=False)
        base.append(time.perf_counter() - t0)

    widths, lrs = sorted({r["axes"]["WIDTH"] for r in records}), sorted({r["axes"]["LR"] for r in records})
    ids_by_axes = {(r["axes"]["WIDTH"], r["axes"]["LR"]): r["job_id"] for r in records}
    t0 = time.perf_counter()
    for r in records:
        job_identity(r["config"], {"base_bfn": make_record, "X": np.zeros((1000, 32))}, r["axes"])
    ident = (time.perf_counter() - t0) / len(records)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.dir or os.path.join(tmp, "bench")
        writes = []
        with Store(path) as st:
            st.begin_sweep(["WIDTH", "LR"], [widths, lrs], [ids_by_axes[(w, lr)] for w in widths for lr in lrs])
            for r in records:
                t0 = time.perf_counter()
                st.write(r)
                writes.append(time.perf_counter() - t0)
            db = st.path
        size = os.path.getsize(db) + sum(os.path.getsize(f"{db}{s}") for s in ("-wal", "-shm")
                                         if os.path.exists(f"{db}{s}"))
        t0 = time.perf_counter()
        ds = load(path).to_xarray()
        t_load = time.perf_counter() - t0
        assert ds.sizes["step"] == args.steps and int((ds.status == "done").sum()) == args.jobs

    print(f"{args.jobs} jobs, {args.steps}-step curves, {args.evals} evals, {n_bytes / 2**20:.2f} MB of arrays per job")
    print(f"write:    {1e3 * statistics.mean(writes):.2f} ms/job (median {1e3 * statistics.median(writes):.2f}, "
          f"max {1e3 * max(writes):.2f})")
    print(f"baseline: {1e3 * statistics.mean(base):.2f} ms/job (np.save of the same arrays to memory)")
    print(f"identity: {1e3 * ident:.3f} ms/job (job_identity, with a 1000x32 array in bfn_config)")
    print(f"size:     {size / 2**20:.1f} MB ({size / args.jobs / 2**10:.0f} KB/job, "
          f"{size / (n_bytes * args.jobs):.3f}x the raw arrays)")
    print(f"load:     {1e3 * t_load:.0f} ms for load(path).to_xarray()")


if __name__ == "__main__":
    main()
