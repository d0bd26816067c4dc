#!/usr/bin/env python
"""What --mergekit-exact costs per tensor: one Mistral-7B MLP-shaped tensor (14336 x 4096, bf16),
a base and three fine-tunes, merged by the default path (as the engine runs it: float32
accumulation, the fused weighted sum where a method is linear) and by mergekit's arithmetic.
Best of 3, 2 threads.

    python benchmarks/exact_cost.py
"""
import time

import torch

import evomerge.methods as methods
from evomerge.methods.kernels import Workspace, weighted_sum
from evomerge.methods.registry import Inputs

torch.set_num_threads(2)
torch.manual_seed(0)
shape = (14336, 4096)
base = torch.randn(shape, dtype=torch.bfloat16)
tuned = [base + 0.01 * torch.randn(shape, dtype=torch.bfloat16) for _ in range(3)]
tensors = (base, *tuned)
out = torch.empty(shape, dtype=torch.bfloat16)
workspace = Workspace()
cases = {
    "task_arithmetic": dict(weight=[0.5, 0.3, 0.2], density=[1.0] * 3, lambda_=1.0, normalize=False, rescale=False),
    "ties": dict(weight=[0.5, 0.3, 0.2], density=[0.5] * 3, lambda_=1.0, normalize=True, rescale=False),
    "slerp": dict(t=0.4),
}


def best(fn):
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


print("| method | default s | exact s | exact / default |")
print("|---|---:|---:|---:|")
for name, params in cases.items():
    method = methods.get(name)
    inputs = tensors[:2] if name == "slerp" else tensors
    resolved = {("lambda" if k == "lambda_" else k): v for k, v in params.items()}
    coefficients = method.coefficients(len(inputs), 0, **resolved) if method.coefficients else None

    def default():
        if coefficients is not None:
            return weighted_sum(inputs, coefficients, out=out)
        work = tuple(t.float() for t in inputs)
        out.copy_(method(Inputs(work, 0, out=None, workspace=workspace), **resolved))

    def exact():
        out.copy_(method(Inputs(inputs, 0), exact=True, **resolved))

    d, e = best(default), best(exact)
    print(f"| {name} | {d:.3f} | {e:.3f} | {e / d:.2f}x |")
