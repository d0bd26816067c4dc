"""Kernel limits across all of a sandboxed program's processes: a pids and a memory cgroup.

rlimits hold per process, and RLIMIT_NPROC not at all for a program whose uid outside its user
namespace is root; a cgroup bounds the whole tree whoever started the evaluator: every process and
thread, every byte of memory including SysV/POSIX shared memory and tmpfs pages. One cgroup per
program, under the evaluator's own (cgroup v2 where the unified hierarchy has both controllers
delegated, else the v1 `pids` and `memory` hierarchies); where neither can be made (no permission,
no controller) `Cgroups.available()` is None and the sandbox says so in its record.
"""

from __future__ import annotations

import functools
import os
import secrets
import signal
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def _own_path(controller: str | None) -> str | None:
    """The evaluator's cgroup in a hierarchy (None: the v2 one), from /proc/self/cgroup."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _id, names, path = line.split(":", 2)
        if (controller is None and _id == "0" and names == "") or (controller in names.split(",")):
            return path
    return None


class Cgroup:
    """One program's cgroup (one folder per hierarchy): limits set, processes joined by writing to
    `procs`, everything in it killed and the folders removed by `close()`."""

    def __init__(self, folders: list[Path], version: int):
        self.folders, self.version = folders, version

    @property
    def procs(self) -> list[str]:
        return [str(folder / "cgroup.procs") for folder in self.folders]

    def limit(self, *, processes: int, memory_bytes: int) -> None:
        for folder in self.folders:
            names = {p.name for p in folder.iterdir()}
            settings = (
                [("pids.max", processes), ("memory.max", memory_bytes), ("memory.swap.max", 0)]
                if self.version == 2 else
                [("pids.max", processes), ("memory.limit_in_bytes", memory_bytes),
                 ("memory.memsw.limit_in_bytes", memory_bytes)])
            for name, value in settings:
                if name in names:
                    (folder / name).write_text(f"{value}\n")

    def close(self) -> None:
        """Kills whatever is left in the cgroup and removes it; never raises."""
        for folder in self.folders:
            kill = folder / "cgroup.kill"
            if kill.exists():
                try:
                    kill.write_text("1\n")
                except OSError:
                    pass
            for _ in range(200):
                try:
                    pids = [int(p) for p in (folder / "cgroup.procs").read_text().split()]
                except (OSError, ValueError):
                    pids = []
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                time.sleep(0.005)
            for _ in range(200):
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # the last processes are still exiting
                    time.sleep(0.005)


class Cgroups:
    """Where this process can make cgroups with both controllers."""

    def __init__(self, parents: list[Path], version: int):
        self.parents, self.version = parents, version

    def make(self) -> Cgroup | None:
        name = f"evomerge-sandbox-{os.getpid()}-{secrets.token_hex(4)}"
        made: list[Path] = []
        try:
            for parent in self.parents:
                (parent / name).mkdir()
                made.append(parent / name)
        except OSError:
            Cgroup(made, self.version).close()
            return None
        return Cgroup(made, self.version)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def available() -> "Cgroups | None":
        """Found once per process: v2 with pids and memory delegated, else v1 pids + memory."""
        candidates: list[Cgroups] = []
        own = _own_path(None)
        if own is not None and (ROOT / "cgroup.controllers").exists():
            parent = ROOT / own.lstrip("/")
            try:
                enabled = (parent / "cgroup.subtree_control").read_text().split()
            except OSError:
                enabled = []
            if {"pids", "memory"} <= set(enabled):
                candidates.append(Cgroups([parent], 2))
        pids, memory = _own_path("pids"), _own_path("memory")
        if pids is not None and memory is not None:
            candidates.append(Cgroups([ROOT / "pids" / pids.lstrip("/"), ROOT / "memory" / memory.lstrip("/")], 1))
        for found in candidates:
            if not all(p.is_dir() for p in found.parents):
                continue
            probe = found.make()
            if probe is None:
                continue
            try:
                probe.limit(processes=8, memory_bytes=64 << 20)
                usable = True
            except OSError:
                usable = False
            probe.close()
            if usable:
                return found
        return None


def join_command(cgroup: Cgroup, command: list[str]) -> list[str]:
    """`command`, started by a shell that first moves itself into the cgroup: every process the
    command starts is inside from its first instruction (no window between start and joining)."""
    script = 'for f in "$@"; do case "$f" in --) break;; esac; echo $$ > "$f" || exit 125; shift; done; shift; exec "$@"'
    return ["/bin/sh", "-c", script, "sh", *cgroup.procs, "--", *command]
