#!/usr/bin/env python
"""One-time cost of mapping a 7B-shaped (Mistral: 32000 x 4096, bf16) embedding of three sources
onto a 32002-token union vocabulary, against copying the same bytes."""
import time

import torch

from evomerge.engine.vocab import Vocabulary
from evomerge.recipe import TokenizerSetting

torch.set_num_threads(2)
V, H, dt = 32000, 4096, torch.bfloat16
ids = {f"t{i}": i for i in range(V + 2)}
index = {"base": torch.cat([torch.arange(V), torch.tensor([-1, -1])]), "chat": torch.arange(V + 2),
         "math": torch.cat([torch.arange(V), torch.tensor([V, -1])])}
tensors = {"base": torch.randn(V, H, dtype=dt), "chat": torch.randn(V + 2, H, dtype=dt), "math": torch.randn(V + 1, H, dtype=dt)}
voc = Vocabulary(TokenizerSetting(source="union"), None, ids, V + 2, index, {})
voc.map("e", tensors, base="base")
times = []
for _ in range(3):
    t = time.perf_counter()
    voc.map("e", tensors, base="base")
    times.append(time.perf_counter() - t)
moved = sum(t.numel() * 2 for t in tensors.values()) + 3 * (V + 2) * H * 2
c = []
for _ in range(3):
    t = time.perf_counter()
    [x.clone() for x in tensors.values()]
    [torch.empty((V + 2, H), dtype=dt).zero_() for _ in range(3)]
    c.append(time.perf_counter() - t)
print(f"map: {min(times):.3f} s for {moved/1e9:.2f} GB moved; clone+zero of the same bytes: {min(c):.3f} s; ratio {min(times)/min(c):.2f}")
