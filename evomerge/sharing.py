"""How this process shares the machine's cores with other processes (no torch here: the OpenMP
wait policy must be chosen before torch loads its OpenMP runtime).

Measured by benchmarks/shared_machine.py (docs/benchmarks.md, "A shared machine"): with one thread
per core, OpenMP's threads spin while they wait for each other, and the thread that shares its core
with another process's work makes every parallel step wait for its time slice; one busy neighbour
slowed SmolLM2 forward passes 5-7x on 2 cores. Threads that sleep while they wait
(OMP_WAIT_POLICY=PASSIVE) hold it to 1.2x, but cost ~15 % on a quiet machine; so evomerge chooses
passive waiting only when other processes are busy on its cores as it starts.
"""

from __future__ import annotations

import os
import time

WAIT_ENV = "OMP_WAIT_POLICY"


def cores() -> set[int]:
    """The cores this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def _busy_ticks(mine: set[int]) -> int | None:
    """Busy clock ticks so far on the cores `mine`, from /proc/stat (None where there is none)."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in mine:
            ticks = [int(f) for f in fields]
            busy += sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # all but idle and iowait
    return busy


def others_busy_cores(window: float = 0.05) -> float:
    """Cores' worth of work other processes did on this process's cores over `window` seconds."""
    mine = cores()
    before, own_before, start = _busy_ticks(mine), sum(os.times()[:2]), time.monotonic()
    if before is None:
        return 0.0
    time.sleep(window)
    after, own_after, elapsed = _busy_ticks(mine), sum(os.times()[:2]), time.monotonic() - start
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return max(0.0, ((after or before) - before) / hz - (own_after - own_before)) / elapsed


def free_cores(window: float = 0.5) -> int:
    """The available cores that other processes leave free (at least one)."""
    count = len(cores())
    return max(1, min(count, round(count - others_busy_cores(window))))


def choose_wait_policy() -> str | None:
    """Sets OMP_WAIT_POLICY=PASSIVE when other processes keep at least half a core of ours busy, unless
    the user set it or torch is already loaded (then it is too late to matter); returns what it set."""
    import sys

    if WAIT_ENV in os.environ or "torch" in sys.modules:
        return None
    if others_busy_cores() >= 0.5:
        os.environ[WAIT_ENV] = "PASSIVE"
        return "PASSIVE"
    return None
