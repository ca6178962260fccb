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

__all__ = ["Driver", "DEFAULT_STALE_AFTER", "SCHEDULER_HOST", "CLAIM_COLS", "CLAIMS_SQL", "claim_dict", "claim_live",
           "ClaimsTable"]

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



class ClaimsTable:
    """The claims table of a results database: ``db.Store``'s methods for which driver runs which job (its
    ``_guard``, ``_write_transaction`` and ``_writable`` do the SQLite part)."""

    def claim(self, job_id: str, driver: "Driver", since: float | None = None,
              stale_after: float = DEFAULT_STALE_AFTER) -> tuple[str, dict | None]:
        """Try to make ``driver`` the one that runs ``job_id``, in one transaction. Returns ``(outcome, owner)``:

        - ``("stored", None)``: a record of the job was written at or after ``since`` (another driver ran it
          while this one was going; pass the time the driver started);
        - ``("busy", owner)``: a live driver holds it (``owner`` is its claim: driver, host, pid, started,
          heartbeat); skip it for now;
        - ``("claimed", None)``: it is ``driver``'s now; ``("taken_over", owner)``: it was, until now, claimed by
          a driver that is dead (on this host its pid is gone) or silent for more than ``stale_after`` seconds.
        """
        self._writable()
        now = time.time()
        with self._guard(f"claiming job {job_id}") as conn, self._write_transaction(conn):
            if since is not None and conn.execute("SELECT 1 FROM jobs WHERE job_id = ? AND created >= ?",
                                                  (job_id, since)).fetchone():
                return "stored", None
            row = conn.execute(f"SELECT {CLAIM_COLS} FROM claims WHERE job_id = ?", (job_id,)).fetchone()
            owner = claim_dict(row) if row is not None else None
            if owner is not None and owner["driver"] != driver.id and claim_live(owner, now, stale_after):
                return "busy", owner
            conn.execute("INSERT OR REPLACE INTO claims (job_id, driver, host, pid, started, claimed, heartbeat) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (job_id, driver.id, driver.host, driver.pid, driver.started, now, now))
        if owner is not None and owner["driver"] != driver.id:
            return "taken_over", owner
        return "claimed", None

    def heartbeat(self, driver: "Driver") -> int:
        """Mark every claim of ``driver`` alive now; returns how many it holds."""
        self._writable()
        with self._guard("refreshing claims") as conn:
            return conn.execute("UPDATE claims SET heartbeat = ? WHERE driver = ?",
                                (time.time(), driver.id)).rowcount

    def release(self, driver: "Driver", job_ids=None) -> None:
        """Drop ``driver``'s claims on ``job_ids`` (all of them if None): the jobs are finished or abandoned."""
        self._writable()
        with self._guard("releasing claims") as conn:
            if job_ids is None:
                conn.execute("DELETE FROM claims WHERE driver = ?", (driver.id,))
            else:
                conn.executemany("DELETE FROM claims WHERE job_id = ? AND driver = ?",
                                 [(str(j), driver.id) for j in job_ids])

    def claims(self) -> list[dict]:
        """Every claim, live or not: job_id, driver, host, pid, started, claimed, heartbeat. Empty for a
        schema-1 store opened read-only."""
        with self._guard("reading claims") as conn:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'claims'").fetchone():
                return []
            rows = conn.execute(f"SELECT {CLAIM_COLS} FROM claims ORDER BY claimed").fetchall()
        return [claim_dict(row) for row in rows]

    def live_claims(self, stale_after: float = DEFAULT_STALE_AFTER) -> list[dict]:
        """The claims of drivers that are alive (see ``claim``): job_id, driver, host, pid, started, claimed,
        heartbeat. Empty for a schema-1 store opened read-only."""
        now = time.time()
        return [c for c in self.claims() if claim_live(c, now, stale_after)]


# The claims table (schema 2).
CLAIMS_SQL = """
CREATE TABLE claims (
    job_id    TEXT PRIMARY KEY,
    driver    TEXT NOT NULL,
    host      TEXT NOT NULL,
    pid       INTEGER NOT NULL,
    started   REAL NOT NULL,
    claimed   REAL NOT NULL,
    heartbeat REAL NOT NULL
);
CREATE INDEX claims_driver ON claims(driver);
"""
