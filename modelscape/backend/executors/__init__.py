"""Where jobs run. An executor takes ``JobSpec``s through ``submit`` and hands back futures of records.

The job iterator only uses ``submit``, ``as_completed`` and ``shutdown`` (as with ``submitit``), so a
distributed engine (Ray, Slurm) is one more class here, not a change to the iterator.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from modelscape.backend.executors.base import Executor, JobSpec
from modelscape.backend.executors.inprocess import InProcessExecutor
from modelscape.backend.executors.pool import PoolExecutor


def cuda_devices(devices) -> list[int]:
    """The requested GPU ids that exist (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    n = torch.cuda.device_count()
    bad = [d for d in devices if not 0 <= int(d) < n]
    if bad:
        raise ValueError(f"DEVICES={list(devices)} names GPUs {bad} but only {n} are visible")
    return [int(d) for d in devices]


def slots(devices, workers_per_device) -> list[str]:
    """One device string per worker slot: each GPU id repeated WORKERS_PER_DEVICE times, or CPU slots
    (WORKERS_PER_DEVICE of them; 0 means one per core)."""
    gpus = cuda_devices(devices)
    if gpus:
        return [f"cuda:{d}" for d in gpus for _ in range(max(1, workers_per_device))]
    n = workers_per_device if workers_per_device > 0 else (os.cpu_count() or 1)
    return ["cpu"] * n


def make_executor(kind: str, devices=(0,), workers_per_device: int = 1, ray_address=None) -> Executor:
    """``inprocess``, ``pool``, ``auto`` (in-process for a single slot, else a pool over every slot), or
    ``ray`` (tasks on the Ray at ``ray_address``; None starts a local one). ``slurm`` is not an executor of
    single jobs: the job iterator hands a whole sweep to ``executors.slurm``."""
    if kind == "ray":
        from modelscape.backend.executors.ray_executor import RayExecutor  # optional: imported only here
        return RayExecutor(ray_address, workers_per_device)
    where = slots(devices, workers_per_device)
    if kind == "auto":
        kind = "inprocess" if len(where) == 1 else "pool"
    if kind == "inprocess":
        return InProcessExecutor(where[0])
    if kind == "pool":
        return PoolExecutor(where)
    raise ValueError(f"EXECUTOR={kind!r}; choose auto, inprocess, pool or ray")


__all__ = ["Executor", "JobSpec", "InProcessExecutor", "PoolExecutor", "make_executor", "slots"]
