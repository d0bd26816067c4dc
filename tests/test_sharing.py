"""A shared machine: evomerge waits passively when other processes keep its cores busy."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO

PROBE = "import evomerge, os; print(evomerge.WAIT_POLICY, os.environ.get('OMP_WAIT_POLICY'))"


def _probe(env: dict) -> str:
    return subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_busy_neighbour_makes_threads_wait_passively_and_the_users_setting_wins():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    neighbours = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(len(os.sched_getaffinity(0)))]
    try:
        import time

        time.sleep(0.5)
        assert _probe(env) == "PASSIVE PASSIVE"  # every core busy: passive waiting, before torch loads
        assert _probe({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "None ACTIVE"  # the user's choice stands
    finally:
        for neighbour in neighbours:
            neighbour.kill()
            neighbour.wait()


def test_the_policy_is_chosen_before_torch_loads():
    """evomerge/__init__ must not import torch before choosing: OpenMP reads the variable once, at load."""
    out = subprocess.run([sys.executable, "-c", "import sys, evomerge.sharing; print('torch' in sys.modules)"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
