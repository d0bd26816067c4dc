"""A shared machine: how much does one busy neighbour slow a search's work, per thread policy?

The work is what a trial spends its time on: SmolLM2-135M forward passes in bfloat16 (batches of 8 x
128 tokens, as gold log-likelihood scoring runs them). Each policy runs in a fresh process, quiet and
then beside one neighbour (a process spinning on one core at normal priority, as another user's job
would), and the table gives wall seconds and the ratio busy / quiet. Policies:

- auto: evomerge's default (evomerge/sharing.py): one thread per core, and passive waiting when
  other processes are busy on its cores as it starts
- all-cores: one thread per available core, OpenMP's default waiting (evomerge before this benchmark)
- passive: the same, with OpenMP threads that sleep instead of spinning while they wait
  (OMP_WAIT_POLICY=PASSIVE, set before torch loads)
- short-spin: threads spin 10,000 times before they sleep (GOMP_SPINCOUNT=10000; libgomp's default
  spins 300,000 times, far longer than a neighbour's time slice leaves it)
- free-cores: the cores not used by other processes, measured over 0.5 s when the work starts
  (`evomerge.sharing.free_cores`)
- free-cores+passive, free-cores+short-spin

Usage: python benchmarks/shared_machine.py [--reps 12] [--policies all-cores passive short-spin ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POLICIES = ("auto", "all-cores", "passive", "short-spin", "free-cores", "free-cores+passive", "free-cores+short-spin")
WAITING = {"passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "short-spin": {"GOMP_SPINCOUNT": "10000"}}


def child(policy: str, reps: int) -> None:
    if policy == "auto":  # evomerge's default: imported before torch, it chooses the wait policy itself
        sys.path.insert(0, str(REPO))
        import evomerge  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO))
    from evomerge.demo.smollm2 import ensure_base
    from evomerge.device import available_cores
    from evomerge.sharing import free_cores

    threads = free_cores() if policy.startswith("free-cores") else available_cores()
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(ensure_base(), dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids)  # warm-up
        start = time.perf_counter()
        for _ in range(reps):
            model(ids)
        seconds = time.perf_counter() - start
    print(json.dumps({"policy": policy, "threads": threads, "seconds": seconds}))


def run(policy: str, reps: int) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(WAITING.get(policy.split("+")[-1], {}))
    out = subprocess.run([sys.executable, __file__, "--child", policy, "--reps", str(reps)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.reps)
        return
    sys.path.insert(0, str(REPO))
    from evomerge.device import available_cores
    from evomerge.report.tables import markdown_table

    rows = []
    for policy in args.policies:
        quiet = run(policy, args.reps)
        neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1.0)
            busy = run(policy, args.reps)
        finally:
            neighbour.kill()
            neighbour.wait()
        rows.append([policy, f"{quiet['threads']} / {busy['threads']}", f"{quiet['seconds']:.1f}", f"{busy['seconds']:.1f}",
                     f"{busy['seconds'] / quiet['seconds']:.2f}x"])
        print(f"<!-- {policy}: quiet {quiet['seconds']:.1f} s, busy {busy['seconds']:.1f} s -->", flush=True)
    print(f"\n{available_cores()} cores; {args.reps} forward passes of SmolLM2-135M (bf16, 8 x 128 tokens) per run; "
          "neighbour: one process spinning on one core at normal priority.\n")
    print(markdown_table(["policy", "threads quiet / busy", "quiet s", "busy s", "busy / quiet"], rows))


if __name__ == "__main__":
    main()
