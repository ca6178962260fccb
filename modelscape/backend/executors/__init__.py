"""Where units of work run. An executor takes ``JobSpec``s through ``submit`` and hands back futures of records.

The sweep engine only uses ``submit``, ``as_completed`` and ``shutdown`` (as with ``submitit``), so a distributed
engine (Ray) is one more class here, not a change to the engine. Every executor runs a unit with
``runner.run_unit``. Slurm is not here: it takes a whole sweep, not single units (``backend.slurm``).
"""
from __future__ import annotations

import warnings

import torch

from modelscape.backend.executors.base import Executor, JobSpec, cpu_cores, default_threads
from modelscape.backend.executors.inprocess import InProcessExecutor
from modelscape.backend.executors.pool import PoolExecutor
from modelscape.backend.executors.ray_executor import RayExecutor


def cuda_devices(devices) -> list[int]:
    """The requested GPU ids that exist (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    n = torch.cuda.device_count()
    bad = [d for d in devices if not 0 <= int(d) < n]
    if bad:
        raise ValueError(f"DEVICES={list(devices)} names GPUs {bad} but only {n} are visible")
    return [int(d) for d in devices]


MAX_WORKERS_PER_GPU = 8
WORKER_GPU_BYTES = 2 * 2 ** 30  # a CUDA context and a small model's working set, per worker


def workers_per_gpu(gpus: list) -> int:
    """WORKERS_PER_DEVICE=0 (auto) on CUDA: one job per GPU leaves it mostly idle when the model is small (its
    step is kernel launches), so run as many workers per GPU as the least free GPU memory (``WORKER_GPU_BYTES``
    each) and this machine's cores (one each, shared among the GPUs) allow, at most ``MAX_WORKERS_PER_GPU``."""
    cores = max(1, cpu_cores() // max(1, len(gpus)))
    free = min(torch.cuda.mem_get_info(d)[0] for d in gpus)
    return max(1, min(MAX_WORKERS_PER_GPU, cores, int(free // WORKER_GPU_BYTES)))


def slots(devices, workers_per_device) -> list[str]:
    """One device string per worker slot: each GPU id repeated WORKERS_PER_DEVICE times, or CPU slots
    (WORKERS_PER_DEVICE of them). 0 (auto): ``workers_per_gpu`` per GPU, or one per core without CUDA."""
    gpus = cuda_devices(devices)
    if gpus:
        per = workers_per_device if workers_per_device > 0 else workers_per_gpu(gpus)
        return [f"cuda:{d}" for d in gpus for _ in range(per)]
    n = workers_per_device if workers_per_device > 0 else cpu_cores()
    return ["cpu"] * n


def make_executor(kind: str, devices=(0,), workers_per_device: int = 1, threads: int = 0,
                  job_timeout: float | None = None, ray_address=None) -> Executor:
    """``pool`` (worker processes, one per slot; ``auto`` means the same), ``inprocess`` (this process:
    for debugging, unprotected from a job that crashes or hangs, and unable to enforce ``job_timeout``), or
    ``ray`` (tasks on the Ray at ``ray_address``; None starts a local one). ``slurm`` is not an executor of
    single jobs: the job iterator hands a whole sweep to ``backend.slurm``.

    ``threads``: torch threads per job (0 = ``default_threads``: the idle cores shared by the jobs that run
    at once)."""
    if kind == "ray":
        return RayExecutor(ray_address, workers_per_device)
    where = slots(devices, workers_per_device)
    if kind == "auto":
        kind = "pool"
    if kind == "inprocess":
        if job_timeout is not None:
            warnings.warn(f"JOB_TIMEOUT={job_timeout} is not enforced by EXECUTOR='inprocess' (a job in this "
                          "process cannot be stopped); use the pool", stacklevel=2)
        return InProcessExecutor(where[0], threads)
    if kind == "pool":
        return PoolExecutor(where, threads, job_timeout)
    raise ValueError(f"EXECUTOR={kind!r}; choose auto, inprocess, pool or ray")


__all__ = ["Executor", "JobSpec", "InProcessExecutor", "PoolExecutor", "RayExecutor", "make_executor", "slots",
           "default_threads", "cpu_cores"]
