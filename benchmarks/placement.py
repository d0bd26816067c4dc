"""Seconds per candidate on each placement tier, against each tier's bandwidth bound, in one run.

Sources: SmolLM2-135M (the demo family's base) + 3 synthetic fine-tunes of it (the demo family's
shapes; float32 files, held in bfloat16 as demo.yaml does). Per tier and method: the median of
--reps merges after a warm-up, and the bandwidth bound of that tier:
  - device / host (one memory on a CPU): sources read once + output written once, at this machine's
    copy bandwidth (measured in the same run: (read + write) / time of a 64 MB copy_);
  - disk, warm page cache: the files' bytes copied into the read buffers, then as above;
  - disk, cold (the page cache dropped before each merge; needs root): the files' bytes at the disk's
    read bandwidth (measured in the same run: a cold read of one source file).
The ratio column is measured / bound (1.0 = at the bound). The task-vector cache is off on every tier
(it only exists on the device tier), so the tiers are compared on the same arithmetic.

On CUDA (--device cuda) the bound is the plan's own (evomerge.engine.memory.MemoryPlan.
seconds_per_candidate with bandwidths measured on that GPU: HBM for the device tier, pinned
host-to-device copies for the host tier) and the cold rows drop the page cache the same way.

Usage: python benchmarks/placement.py [--device cpu|cuda] [--reps 3] [--methods task_arithmetic,ties,dare_ties]
                                      [--no-cold]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.merge_speed import derived_copies  # noqa: E402
from evomerge.demo.smollm2 import ensure_base  # noqa: E402
from evomerge.engine import MergeEngine, memory  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def cold_read_bandwidth(file: Path) -> float:
    drop_page_cache()
    start = time.perf_counter()
    with open(file, "rb") as handle:
        while handle.read(1 << 24):
            pass
    return file.stat().st_size / (time.perf_counter() - start)


def recipe(method: str, refs: list[str]) -> Recipe:
    params = {"weight": 0.4, "density": 0.5}
    return Recipe.from_dict({"merge_method": method, "base_model": refs[0], "dtype": "bfloat16",
                             "models": [{"model": r, "parameters": params} for r in refs[1:]]})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--methods", default="task_arithmetic,ties,dare_ties")
    parser.add_argument("--no-cold", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    base = ensure_base()
    refs = [str(base), *(str(p) for p in derived_copies(base))]
    file_bytes = sum((Path(r) / "model.safetensors").stat().st_size for r in refs)
    device = torch.device(args.device)
    bw = memory.bandwidths(device, present=True)
    tiers = ["device", "host", "disk"] + ([] if args.no_cold else ["disk (cold)"])
    disk_bw = None
    if "disk (cold)" in tiers:
        if drop_page_cache():
            disk_bw = cold_read_bandwidth(Path(refs[1]) / "model.safetensors")
        else:
            tiers.remove("disk (cold)")
            print("# cold-disk rows skipped: dropping the page cache needs root")
    print(f"# {device}, {os.cpu_count()} cores; copy bandwidth {bw.device / 1e9:.1f} GB/s (read + write)"
          + (f"; pinned host-to-device {bw.host / 1e9:.1f} GB/s" if device.type == "cuda" else "")
          + (f"; cold disk read {disk_bw / 1e9:.2f} GB/s" if disk_bw else ""))
    rows = []
    for tier in tiers:
        placement = tier.split()[0]
        engine = MergeEngine(refs, base_model=refs[0], device=device, dtype="bfloat16", placement=placement,
                             delta_cache=False, progress=False)
        plan = engine.memory_plan
        sources = sum(s.bytes for s in plan.needs.sources)
        out = plan.needs.model
        if device.type == "cuda" and tier != "disk (cold)":
            bound = plan.seconds_per_candidate()["total"]
        elif placement in ("device", "host"):
            bound = (sources + out) / bw.device
        elif tier == "disk":
            bound = (file_bytes + sources + out) / bw.device
        else:
            bound = file_bytes / disk_bw
        for method in args.methods.split(","):
            r = recipe(method, refs)
            engine.materialize(r, seed=0)  # warm-up: scratch, read buffers, page cache
            times = []
            for i in range(args.reps):
                if tier == "disk (cold)":
                    drop_page_cache()
                start = time.perf_counter()
                engine.materialize(r, seed=i)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            rows.append((tier, method, seconds, bound, seconds / bound))
            print(f"{tier:<12s} {method:<16s} {seconds:7.2f} s/candidate   bound {bound:6.2f} s   "
                  f"ratio {seconds / bound:5.1f}", flush=True)
        engine.release()
        del engine

    print()
    print("| tier | method | s/candidate | bandwidth bound (s) | measured / bound |")
    print("|---|---|---|---|---|")
    for tier, method, seconds, bound, ratio in rows:
        print(f"| {tier} | {method} | {seconds:.2f} | {bound:.2f} | {ratio:.1f} |")
    print(f"\nsources: {len(refs)} x SmolLM2-135M, {sum(s.bytes for s in plan.needs.sources) / 1e9:.2f} GB in "
          f"bfloat16 ({file_bytes / 1e9:.2f} GB of float32 files); resident model {plan.needs.model / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
