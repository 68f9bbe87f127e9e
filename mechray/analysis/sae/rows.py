"""The rows a sparse autoencoder trains and is evaluated on, streamed from a store.

Usage::

    from mechray.analysis.sae.rows import LayerRows

    rows = LayerRows(store, "popt", params, torch.device("cpu"))
    for batch in rows.batches(epochs=None):      # shuffled training batches, epoch after epoch
        ...
    held_out = rows.eval_rows()                  # the held-out rows of every shard read

Each shard's rows are split into training and held-out rows by a seeded permutation (the same
in every run), kept in memory when they fit ``buffer_mb`` and streamed through a shuffle buffer
otherwise.
"""

from __future__ import annotations

import itertools
import math
import zlib
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

from mechray.analysis.base import Skip

if TYPE_CHECKING:
    from mechray.analysis.sae.params import SAEParams


class LayerRows:
    """Deterministic train / held-out split of a layer's shards, served as shuffled row groups."""

    def __init__(self, store: Any, layer: str, p: "SAEParams", device: torch.device):
        self.store, self.layer, self.p, self.device = store, layer, p, device
        store.check_layer(layer)         # raises KeyError naming the captured layers
        info = store.layers()[layer]
        self.d = int(math.prod(info["feature_shape"])) if info["feature_shape"] else 1
        total = info["rows"]
        self.n_train = self.n_available = total - round(p.holdout_fraction * total)
        if p.max_rows is not None:
            self.n_train = min(self.n_train, p.max_rows)
        budget, row_bytes = p.buffer_mb * 2 ** 20, 4 * self.d
        # peak memory: in memory, the rows plus one copy while joining shards; streaming, the
        # buffer, its joined copy and its shuffled copy
        self.in_memory = 2 * self.n_train * row_bytes <= budget
        self.capacity = max(2 * p.batch_size, int(budget / (3 * row_bytes)))
        self.quota = math.ceil(p.max_eval_rows / max(1, info["shards"]))
        self.held: dict[str, torch.Tensor] = {}
        self.train: Optional[torch.Tensor] = None
        self.complete = False            # every shard within the row budget has been split
        self.sample: Optional[torch.Tensor] = None
        self.epoch = 0

    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.p.batch_size)

    def _shards(self, train: bool = True) -> Iterator[torch.Tensor]:
        """Training rows per shard (holding out rows on the way), up to ``max_rows`` in all."""
        taken = 0
        for entry, rows in self.store.iter_layer(self.layer):
            if self.p.max_rows is not None and taken >= self.p.max_rows:
                break
            rows = rows.reshape(len(rows), -1)
            seed = self.p.seed * 1_000_003 + zlib.crc32(entry["file"].encode())
            perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
            n_hold = max(1, round(self.p.holdout_fraction * len(rows))) if len(rows) > 1 else 0
            if entry["file"] not in self.held:
                self.held[entry["file"]] = rows[perm[:n_hold][: self.quota].sort().values].float()
            n_train = len(rows) - n_hold if self.p.max_rows is None else \
                min(len(rows) - n_hold, self.p.max_rows - taken)
            taken += n_train
            if train:
                yield rows[perm[n_hold:].sort().values[:n_train]]
        self.complete = True

    def groups(self, epoch: int) -> Iterator[torch.Tensor]:
        """Shuffled groups of training rows (float32, on the device) for one epoch."""
        g = torch.Generator().manual_seed(self.p.seed + 7919 * (epoch + 1))
        if self.in_memory:
            if self.train is None:
                parts = list(self._shards())
                self.train = torch.cat(parts).to(self.device, torch.float32) if parts else \
                    torch.empty(0, self.d, device=self.device)
            yield self.train[torch.randperm(len(self.train), generator=g).to(self.device)]
            return
        buf: list[torch.Tensor] = []
        held = 0
        for rows in self._shards():
            buf.append(rows)
            held += len(rows)
            if held >= self.capacity:
                mixed = torch.cat(buf)
                mixed = mixed[torch.randperm(len(mixed), generator=g)]
                n_out = (len(mixed) - self.capacity // 2) // self.p.batch_size * self.p.batch_size
                yield mixed[:n_out].to(self.device, torch.float32, non_blocking=True)
                buf, held = [mixed[n_out:]], len(mixed) - n_out
        if held:
            mixed = torch.cat(buf)
            yield mixed[torch.randperm(len(mixed), generator=g)].to(self.device, torch.float32)

    def batches(self, epochs: Optional[int]) -> Iterator[torch.Tensor]:
        """Training batches, epoch after epoch (without end when ``epochs`` is None)."""
        for self.epoch in itertools.count() if epochs is None else range(epochs):
            empty = True
            for group in self.groups(self.epoch):
                if self.sample is None:
                    self.sample = group[:65536]     # for b_dec and the input scale
                for i in range(0, len(group), self.p.batch_size):
                    empty = False
                    yield group[i:i + self.p.batch_size]
            if empty:
                raise Skip(f"layer {self.layer!r} has no training rows (holdout_fraction="
                           f"{self.p.holdout_fraction}); capture more rows per shard")

    def eval_rows(self) -> torch.Tensor:
        """Held-out rows of every shard read for training (reads shards not reached yet)."""
        if not self.complete:
            for _ in self._shards(train=False):    # adds the shards training did not reach
                pass
        rows = [r for r in self.held.values() if len(r)]
        if not rows:
            raise Skip(f"layer {self.layer!r} has no held-out rows; raise holdout_fraction "
                       f"or capture more rows per shard")
        return torch.cat(rows)[: self.p.max_eval_rows]
