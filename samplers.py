"""Samplers: which samples make each batch of a rank, resumable at any batch. Padded batches are grouped by modality
(image or text-only) and similar length, so little of a batch is padding; packed batches fill rows of max_length
with whole samples (best fit), and their attention keeps the samples apart (the model's business). Each epoch's order
is a pure function of (seed, epoch), and `set_epoch(epoch, start_batch)` starts it at a batch index without
drawing the batches it skips: that is how a run resumes its data exactly.
"""
from __future__ import annotations

import bisect

import numpy as np
import torch


class GroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices for one rank: DataLoader(dataset, batch_sampler=this, collate_fn=...).

    Each epoch is a pure function of (seed, epoch): the indices of each modality (image vs text-only) are shuffled
    separately, cut into mega-batches of megabatch_mult global steps, sorted by length inside a mega-batch and cut into
    global steps of batch_size * num_replicas, so similar lengths share a step and no step mixes modalities. The step
    order is then shuffled. Rank r takes the r-th slice of every step: ranks never share a sample, except that a
    modality's last step is topped up by wrapping around so every rank has the same number of batches.
    Resume mid-epoch with set_epoch(epoch, start_batch=batches already consumed). The sampler is already rank-aware:
    do not let accelerate shard its DataLoader again."""

    def __init__(self, lengths, is_multimodal, batch_size: int, *, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, group_by_modality_length: bool = True, megabatch_mult: int = 50):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.lengths = np.asarray(lengths)
        self.batch_size, self.num_replicas, self.rank, self.seed = batch_size, num_replicas, rank, seed
        self.grouped, self.megabatch_mult = group_by_modality_length, megabatch_mult
        is_multimodal = np.asarray(is_multimodal, dtype=bool)
        groups = [np.flatnonzero(is_multimodal), np.flatnonzero(~is_multimodal)] if self.grouped \
            else [np.arange(len(self.lengths))]
        self.groups = [g for g in groups if len(g)]
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    @property
    def batches_per_epoch(self) -> int:
        step = self.batch_size * self.num_replicas
        return sum(-(-len(g) // step) for g in self.groups)

    def __len__(self) -> int:
        """Batches left in this epoch from start_batch (batches_per_epoch for a whole epoch)."""
        return max(0, self.batches_per_epoch - self.start_batch)

    def __iter__(self):
        for batch in self.epoch_batches(self.epoch)[self.start_batch:]:
            yield batch.tolist()

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        step, steps = self.batch_size * self.num_replicas, []
        for group in self.groups:
            order = group[rng.permutation(len(group))]
            mega = step * self.megabatch_mult if self.grouped else step
            for start in range(0, len(order), mega):
                chunk = order[start:start + mega]
                if self.grouped:
                    chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                steps += [chunk[i:i + step] for i in range(0, len(chunk), step)]
            short = -len(steps[-1]) % self.num_replicas   # top up the last step so every rank gets a batch
            steps[-1] = np.concatenate([steps[-1], order[np.arange(short) % len(order)]])
        return [np.array_split(steps[j], self.num_replicas)[self.rank] for j in rng.permutation(len(steps))]


class PackedBatchSampler(torch.utils.data.Sampler):
    """Batches of packs for one rank: DataLoader(dataset, batch_sampler=this, collate_fn=collate). A pack is a list
    of dataset indices whose lengths sum to at most max_length; collate turns each pack into one row.

    Each epoch is a pure function of (seed, epoch): the indices are shuffled and every `buffer` of them is packed
    best-fit decreasing (pack_lengths); a buffer's packs are sorted by length, so a batch holds rows of similar
    length (little padding), then cut into global steps of batch_size * num_replicas packs, and the step order is
    shuffled. Rank r takes the r-th slice of every step; the last step is topped up by wrapping around so every rank
    has the same number of batches (the only samples seen twice in an epoch). Modalities mix freely in a row.
    Lengths must be exact (SupervisedDataset.measure_lengths) or rows may overflow; a longer sample gets a row alone.
    Resume mid-epoch with set_epoch(epoch, start_batch=batches already consumed). The number of packs may differ by
    a few between epochs: batches_per_epoch is that of the epoch set last. Do not let accelerate shard its
    DataLoader again."""

    def __init__(self, lengths, max_length: int, batch_size: int, *, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, buffer: int = 16384):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.max_length, self.batch_size, self.buffer = max_length, batch_size, buffer
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch, self.start_batch = 0, 0
        self._cached: tuple[int, list[list[np.ndarray]]] | None = None   # (epoch, its batches): packing takes seconds

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    @property
    def batches_per_epoch(self) -> int:
        return len(self.epoch_batches(self.epoch))

    def __len__(self) -> int:
        """Batches left in this epoch from start_batch (batches_per_epoch for a whole epoch)."""
        return max(0, self.batches_per_epoch - self.start_batch)

    def __iter__(self):
        for batch in self.epoch_batches(self.epoch)[self.start_batch:]:
            yield [pack.tolist() for pack in batch]

    def epoch_batches(self, epoch: int) -> list[list[np.ndarray]]:
        """This rank's batches of the epoch, each a list of packs (arrays of dataset indices)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        packs = []
        for start in range(0, len(order), self.buffer):
            chunk = order[start:start + self.buffer]
            chunk_packs = [chunk[p] for p in pack_lengths(self.lengths[chunk], self.max_length)]
            packs += sorted(chunk_packs, key=lambda p: -int(self.lengths[p].sum()))
        step = self.batch_size * self.num_replicas
        steps = [packs[i:i + step] for i in range(0, len(packs), step)]
        if steps:   # top up the last step so every rank gets a batch of packs
            steps[-1] = steps[-1] + [packs[i % len(packs)] for i in range(-len(steps[-1]) % self.num_replicas)]
        batches = []
        for j in rng.permutation(len(steps)):
            share = len(steps[j]) // self.num_replicas   # exact: every step holds a multiple of num_replicas
            batches.append(steps[j][self.rank * share:(self.rank + 1) * share])
        self._cached = (epoch, batches)
        return batches


def pack_lengths(lengths, capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: longest first, each item into the fullest pack it still fits (a new pack
    when none has room). Returns packs as lists of positions into `lengths`, each summing to <= capacity unless
    an item alone is longer. Ties go to the older pack, so the result is deterministic."""
    rooms: list[tuple[int, int]] = []   # (room left, pack number), sorted: bisect finds the tightest fit
    packs: list[list[int]] = []
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        n = int(lengths[i])
        k = bisect.bisect_left(rooms, (n, -1))
        if k < len(rooms):
            room, p = rooms.pop(k)
        else:
            room, p = capacity, len(packs)
            packs.append([])
        packs[p].append(int(i))
        bisect.insort(rooms, (room - n, p))
    return packs
