"""Remembering what a frozen backbone computed, so that training a model on top of it runs the backbone once per input.

A frozen backbone (no parameter trains, always in eval mode) is a fixed function: the same image or text gives the
same tokens in every epoch. When the training data are fixed too (no random augmentation), every epoch after the first
asks the backbone the same questions again. `BackboneMemo` answers those from memory: each row of a batch is looked
up by its exact content (the bytes of the image and of its padding mask; the text itself), only the rows never seen
run through the backbone, and the result is reassembled in the batch's order. A row's output depends only on that row
(eval mode: no batch statistics, no dropout), so a remembered row is what the backbone gives it again, up to the float
rounding of a batched matmul, which varies with the batch it was computed in.

The memo lives beside the model, never in its state dict: checkpoints and model cards are unchanged, and a model
that stops using it (`memo=None`) is the same model. Memory: one entry per distinct input, e.g. 64 tokens x 128
floats = 32 KiB per SynthRef image at the tiny profile's sizes; `max_entries` bounds it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

from vgstudy.errors import ConfigError


def tensor_key(*rows: torch.Tensor | None) -> bytes:
    """A digest of the exact contents (dtype, shape and bytes) of one input row and its companions (e.g. its mask)."""
    digest = hashlib.blake2b(digest_size=20)
    for row in rows:
        if row is None:
            digest.update(b"none")
            continue
        row = row.detach().contiguous().cpu()
        digest.update(f"{row.dtype}{tuple(row.shape)}".encode())
        digest.update(row.view(torch.uint8).numpy().tobytes() if row.numel() else b"")
    return digest.digest()


class BackboneMemo:
    """Per-input memory of a frozen backbone's outputs.

    `memo.run(keys, compute)` returns the stacked outputs for the batch whose rows `keys` name: the remembered ones
    from memory, the others from `compute(index)` (index: LongTensor of the batch rows to compute), which must return a
    dict of tensors with the batch as first dimension; those rows are then remembered (detached, on the device they
    were computed on). A key of None is a row that may not be remembered (an input without a stable identity): it is
    computed every time. hits and misses count rows, for reporting how much was saved.
    """

    def __init__(self, max_entries: int = 200_000):
        if not isinstance(max_entries, int) or isinstance(max_entries, bool) or max_entries < 1:
            raise ConfigError(f"BackboneMemo max_entries={max_entries!r}: expected a positive integer")
        self.max_entries = max_entries
        self._entries: dict[object, dict[str, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.hits = self.misses = 0

    def run(
        self, keys: Sequence[object | None], compute: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        known = [key is not None and key in self._entries for key in keys]
        # The rows to compute: each unknown key once (a duplicate in the batch reuses its first row), every None row.
        position: dict[int, int] = {}  # batch row -> row of the computed output
        first_of: dict[object, int] = {}
        to_compute: list[int] = []
        for i, key in enumerate(keys):
            if known[i]:
                continue
            if key is not None and key in first_of:
                position[i] = position[first_of[key]]
                continue
            if key is not None:
                first_of[key] = i
            position[i] = len(to_compute)
            to_compute.append(i)
        computed: list[dict[str, torch.Tensor]] = []
        if to_compute:
            out = compute(torch.tensor(to_compute, dtype=torch.long))
            computed = [{name: value[j].detach() for name, value in out.items()} for j in range(len(to_compute))]
            room = max(self.max_entries - len(self._entries), 0)
            for key, i in list(first_of.items())[:room]:
                self._entries[key] = computed[position[i]]
        self.hits += sum(known)
        self.misses += len(keys) - sum(known)
        rows = [self._entries[key] if known[i] else computed[position[i]] for i, key in enumerate(keys)]
        return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}
