"""Where the source tensors live, one tier per source (see evomerge.engine.memory):

- device: rows of a per-tensor stack `[n_models, *shape]` on the device;
- host:   one tensor per (model, name) in host memory, pinned when the device is CUDA;
- disk:   the model's safetensors files memory-mapped; a job's tensors are copied from the mapping
          into reused read buffers and their pages dropped, so resident memory stays at a few jobs'
          inputs whatever the size of the family.

`fetch(pairs, ahead=next_pairs)` hands a job its inputs on the device. A worker thread reads the next job's host and
disk inputs (on CUDA: copies them on a side stream) while the current job merges. Values and
alignment are the same on every tier, so merges are bit-identical whatever the placement.
"""

from __future__ import annotations

import math
import mmap
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from evomerge.checkpoint import SAFETENSORS_DTYPES, safetensors_header
from evomerge.errors import CheckpointError

_PAGE = mmap.PAGESIZE

Pair = tuple[str, str]  # (model ref, tensor name)


class MappedSafetensors:
    """One model's safetensors files, memory-mapped (private, never written): tensors by name as views."""

    def __init__(self, ref: str, files: list[Path]):
        self.ref = ref
        self._maps: list[mmap.mmap] = []
        self.entries: dict[str, tuple[int, torch.dtype, tuple[int, ...], int, int]] = {}
        for index, file in enumerate(files):
            data, header = safetensors_header(file, ref)
            with open(file, "rb") as handle:
                self._maps.append(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY))
            for name, entry in header.items():
                if entry.get("dtype") not in SAFETENSORS_DTYPES:
                    continue
                start, end = entry["data_offsets"]
                self.entries[name] = (index, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                      data + start, data + end)

    def view(self, name: str) -> torch.Tensor:
        """The tensor as stored, backed by the mapping (pages read when touched)."""
        if name not in self.entries:
            raise CheckpointError(f"model '{self.ref}' has no tensor '{name}'")
        index, dtype, shape, start, end = self.entries[name]
        count = (end - start) // torch.empty((), dtype=dtype).element_size()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a private mapping is writable; nothing writes to it
            flat = torch.frombuffer(self._maps[index], dtype=dtype, count=count, offset=start)
        return flat.view(shape)

    def drop(self, name: str) -> None:
        """Releases the tensor's pages from this process (they stay in the page cache)."""
        index, _dtype, _shape, start, end = self.entries[name]
        aligned = start - start % _PAGE
        if end > aligned:
            self._maps[index].madvise(mmap.MADV_DONTNEED, aligned, end - aligned)


# bytes: CPU reductions (torch.dot, norms) round differently when their input starts elsewhere than on
# a vector boundary (measured: a float32 dot product shifted by 1-2 entries changes its low bits). On
# this project's AVX-512 machines 32-byte offsets already gave equal bits; 64 is the widest vector.
ALIGN = 64


class SourceStore:
    """The sources' tensors by tier. Every tensor handed to a merge starts on a 64-byte boundary (stack
    rows are padded to it; host tensors and read buffers are fresh allocations), because CPU reductions
    such as torch.dot give other low bits on other alignments: that is what makes tiers bit-identical."""

    def __init__(self, device: torch.device, dtype: torch.dtype, tiers: dict[str, str]):
        self.device, self.dtype, self.tiers = device, dtype, dict(tiers)
        self.stacks: dict[str, torch.Tensor] = {}  # device tier: name -> [rows, padded entries]
        self.rows: dict[str, dict[str, int]] = {}  # device tier: name -> {model: row}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.host: dict[Pair, torch.Tensor] = {}
        self.mapped: dict[str, MappedSafetensors] = {}
        self._pin = device.type == "cuda"
        self._reader = _Reader(self) if any(t != "device" for t in tiers.values()) else None

    # ------------------------------------------------------------------ filling

    def allocate_stacks(self, names: dict[str, list[str]], shapes: dict[str, tuple[int, ...]]) -> None:
        """names: tensor name -> the device-tier models that hold it."""
        per_align = ALIGN // torch.empty((), dtype=self.dtype).element_size()
        for name, refs in names.items():
            numel = math.prod(shapes[name])
            padded = -(-numel // per_align) * per_align
            self.rows[name] = {ref: i for i, ref in enumerate(refs)}
            self.shapes[name] = tuple(shapes[name])
            self.stacks[name] = torch.empty((len(refs), padded), dtype=self.dtype, device=self.device)

    def put(self, ref: str, name: str, tensor: torch.Tensor) -> None:
        """A loaded tensor of a device- or host-tier source."""
        if self.tiers[ref] == "device":
            self.row(ref, name).copy_(tensor)
        else:
            own = torch.empty(tensor.shape, dtype=self.dtype, pin_memory=self._pin)  # aligned, pinned on CUDA
            self.host[(ref, name)] = own.copy_(tensor)

    def map(self, ref: str, files: list[Path]) -> MappedSafetensors:
        self.mapped[ref] = MappedSafetensors(ref, files)
        return self.mapped[ref]

    @property
    def resident_bytes(self) -> dict[str, int]:
        """Bytes of source tensors held (stack padding excluded)."""
        size = torch.empty((), dtype=self.dtype).element_size()
        device = sum(math.prod(self.shapes[name]) * size * len(rows) for name, rows in self.rows.items())
        return {"device": device, "host": sum(t.numel() * t.element_size() for t in self.host.values())}

    # ------------------------------------------------------------------ reading

    def row(self, ref: str, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        return self.stacks[name][self.rows[name][ref], : math.prod(shape)].view(shape)

    def get(self, ref: str, name: str) -> torch.Tensor:
        """The tensor where it lies (a device row, a host tensor, a view of the mapped file in its
        stored dtype and alignment: `fetch` is what merges read)."""
        tier = self.tiers[ref]
        if tier == "device":
            return self.row(ref, name)
        if tier == "host":
            return self.host[(ref, name)]
        return self.mapped[ref].view(name)

    def fetch(self, pairs: tuple[Pair, ...], ahead: tuple[Pair, ...] | None = None) -> list[torch.Tensor]:
        """The job's inputs on the device, in the engine's dtype, each 64-byte aligned; then starts
        reading `ahead` (the next job's inputs) from the host and disk tiers while this one merges."""
        if self._reader is None:
            return [self.row(*pair) for pair in pairs]
        loaded = self._reader.take(pairs)
        if ahead is not None:
            self._reader.request(ahead)
        return [loaded[pair] if pair in loaded else self.row(*pair) for pair in pairs]

    def clear(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self.stacks.clear()
        self.host.clear()
        self.mapped.clear()


class _Reader:
    """Loads a job's host- and disk-tier inputs in a worker thread, so the next job's reads (and, on
    CUDA, its copies on a side stream) overlap the current job's arithmetic. Disk-tier tensors are
    copied from the mapping into read buffers (in the engine's dtype, pinned on CUDA), two sets used in
    turn, the current job's and the next one's, and their pages dropped. Job i+1 is requested right
    after job i is taken (SourceStore.fetch), so one read is pending at a time."""

    SETS = 2

    def __init__(self, store: SourceStore):
        self.store = store
        self.cuda = store.device.type == "cuda"
        self.stream = torch.cuda.Stream(store.device) if self.cuda else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="evomerge-read")
        self.pending: tuple[tuple[Pair, ...], Future] | None = None
        self.buffers: list[list[torch.Tensor]] = [[] for _ in range(self.SETS)]
        self.turn = 0

    def _buffer(self, which: int, slot: int, like: torch.Tensor) -> torch.Tensor:
        store = self.store
        nbytes = like.numel() * torch.empty((), dtype=store.dtype).element_size()
        slots = self.buffers[which]
        while len(slots) <= slot:
            slots.append(torch.empty(0, dtype=torch.uint8))
        if slots[slot].numel() < nbytes:
            slots[slot] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=store._pin)
        return slots[slot][:nbytes].view(store.dtype).view(like.shape)

    def _load(self, pairs: tuple[Pair, ...], which: int):
        store = self.store
        out: dict[Pair, torch.Tensor] = {}
        for slot, pair in enumerate(pairs):
            tier = store.tiers[pair[0]]
            if tier == "device" or pair in out:
                continue
            if tier == "disk":
                mapped = store.mapped[pair[0]]
                view = mapped.view(pair[1])
                tensor = self._buffer(which, slot, view).copy_(view)
                mapped.drop(pair[1])  # resident memory stays at the read buffers
            else:
                tensor = store.host[pair]
            out[pair] = tensor
        if self.cuda:
            with torch.cuda.stream(self.stream):
                out = {pair: t.to(store.device, non_blocking=True) for pair, t in out.items()}
                event = torch.cuda.Event()
                event.record(self.stream)
            event.synchronize()  # landed: the read buffers may be refilled
        return out

    def _next_set(self) -> int:
        self.turn = (self.turn + 1) % self.SETS
        return self.turn

    def request(self, pairs: tuple[Pair, ...]) -> None:
        if self.pending is None or self.pending[0] != pairs:
            if self.pending is not None:
                self.pending[1].result()  # a stale read must not share buffers with a new one
            self.pending = (pairs, self.pool.submit(self._load, pairs, self._next_set()))

    def take(self, pairs: tuple[Pair, ...]) -> dict[Pair, torch.Tensor]:
        if self.pending is not None and self.pending[0] == pairs:
            out = self.pending[1].result()
        else:
            if self.pending is not None:
                self.pending[1].result()
            out = self._load(pairs, self._next_set())
        self.pending = None
        if self.cuda:
            current = torch.cuda.current_stream(self.store.device)
            for tensor in out.values():
                tensor.record_stream(current)  # allocated on the side stream, read on this one
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True)
