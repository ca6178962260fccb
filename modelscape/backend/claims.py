"""Drivers and their claims: which process runs a job right now, and whether it still lives.

Several drivers may share one store; each claims a job before it runs it (``Store.claim``). A claim names its
driver (host, pid, start time) and carries a heartbeat; ``claim_live`` tells a live claim from one a dead driver
left behind. Imports nothing from modelscape.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass

__all__ = ["Driver", "DEFAULT_STALE_AFTER", "SCHEDULER_HOST", "CLAIM_COLS", "claim_dict", "claim_live"]

DEFAULT_STALE_AFTER = 30.0  # seconds without a heartbeat after which a driver's claims may be taken over
CLAIM_COLS = "job_id, driver, host, pid, started, claimed, heartbeat"
_ACTIVE_DRIVERS: set = set()  # ids of the drivers running in this process
# The host of claims that a scheduler's queued or running array task holds (EXECUTOR=slurm). No machine is
# named so; such a claim is not live here: only the scheduler knows whether its task is (``backend.slurm``).
SCHEDULER_HOST = "<slurm>"


@dataclass(frozen=True)
class Driver:
    """The process running a sweep, as its claims name it: ``Driver.start()`` makes one for this process."""

    id: str
    host: str
    pid: int
    started: float

    @classmethod
    def start(cls) -> "Driver":
        """A new driver of this process, registered as active until ``stop``."""
        host, pid, started = socket.gethostname(), os.getpid(), time.time()
        d = cls(f"{host}:{pid}:{started:.6f}:{uuid.uuid4().hex[:8]}", host, pid, started)
        _ACTIVE_DRIVERS.add(d.id)
        return d

    def stop(self) -> None:
        """This driver is done: any claim of it left behind (a crash) is dead to drivers of this host at once."""
        _ACTIVE_DRIVERS.discard(self.id)


def claim_dict(row) -> dict:
    """A row of the claims table (its columns in ``CLAIM_COLS`` order) as a dict."""
    return dict(zip(CLAIM_COLS.split(", "), row))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine exists (someone else's process counts; unknown counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return True  # cannot tell: trust the heartbeat
    return True


def claim_live(claim: dict, now: float, stale_after: float) -> bool:
    """Whether the driver that holds ``claim`` is alive: its heartbeat is recent and, on this host, its pid
    exists (this process: the driver is still registered)."""
    if claim["host"] == SCHEDULER_HOST or now - claim["heartbeat"] > stale_after:
        return False
    if claim["host"] == socket.gethostname():
        if claim["pid"] == os.getpid():
            return claim["driver"] in _ACTIVE_DRIVERS
        return pid_alive(claim["pid"])
    return True

