"""What every training run shares: step-indexed data, rank-agreed optimiser steps, preemption, the Trainer.

The data a run sees is a pure function of (seed, global draw index): draw ``g`` takes volume
``perm_e[g mod n]`` of epoch ``e = g div n`` and seeds the random transforms from (seed, g). Micro-batch
``b`` of rank ``r`` holds draws ``(b·W + r)·P … (b·W + r)·P + P − 1`` (W ranks, P volumes per micro-batch),
so ranks and loader workers never draw the same crop, ``num_workers`` changes nothing, and a resumed run
starts again at micro-batch ``global_step · accumulate`` — bit-identical to the run that was not stopped.
"""
from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from monai.data import DataLoader
from monai.data.utils import worker_init_fn as monai_worker_init
from torch.utils.data import Dataset, Sampler

from ..errors import SubforeError
from ..preempt import PREEMPT_SIGNALS

log = logging.getLogger(__name__)


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence; the same on every platform)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class DrawDataset(Dataset):
    """Map a global draw index to (volume, transform seed): ``volumes[perm_e[g mod n]]`` seeded from (seed, g).

    ``volumes`` has ``draw(index, seed)`` → that volume's crops (a SafeDataset, or the store's StoreCrops).
    """

    def __init__(self, volumes, seed: int) -> None:
        self.volumes = volumes
        self.seed = seed
        self._epoch, self._perm = -1, None

    def __len__(self) -> int:  # the volumes; the draws are unbounded, StepSampler chooses them
        return len(self.volumes)

    def volume_of(self, g: int) -> int:
        epoch, pos = divmod(int(g), len(self.volumes))
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x5EED))
            self._epoch, self._perm = epoch, torch.randperm(len(self.volumes), generator=gen)
        return int(self._perm[pos])

    def __getitem__(self, g: int):
        return self.volumes.draw(self.volume_of(g), mix_seed(self.seed, g) % (2**32))


class StepSampler(Sampler[int]):
    """Endless draw indices for one rank, starting at micro-batch ``start()`` (read when iteration begins)."""

    def __init__(self, per_batch: int, rank: int, world: int, start: Callable[[], int] = lambda: 0) -> None:
        self.per_batch, self.rank, self.world, self.start = per_batch, rank, world, start

    def __iter__(self) -> Iterator[int]:
        b = int(self.start())
        while True:
            first = (b * self.world + self.rank) * self.per_batch
            yield from range(first, first + self.per_batch)
            b += 1


def _worker_init(worker_id: int) -> None:
    # Preemption signals reach the whole process group; the main process saves and stops the workers itself.
    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    monai_worker_init(worker_id)


def check_fill(n_volumes: int, batch_size: int, samples_per_volume: int, world: int, where: str,
               warn: bool = False) -> int:
    """Volumes per micro-batch and rank. Fewer volumes than one optimiser step takes over all ranks are drawn more
    than once within a step (the draw stream wraps, each crop still a function of (seed, draw)); ``warn`` says so
    once. Fails only without a single volume."""
    per_batch = batch_size // samples_per_volume
    if n_volumes < 1:
        raise SubforeError(f"{where}: no readable volume to train on")
    if warn and n_volumes < per_batch * world:
        log.warning("%s: %d volume(s) for %d per step (train.batch_size=%d crops with data.samples_per_volume=%d is "
                    "%d volume(s) on each of %d rank(s)): volumes are drawn more than once within a step",
                    where, n_volumes, per_batch * world, batch_size, samples_per_volume, per_batch, world)
    return per_batch


def train_loader(volumes, seed: int, per_batch: int, trainer: pl.Trainer, num_workers: int) -> DataLoader:
    """The endless, step-indexed training loader of one rank (resumes at ``global_step · accumulate``)."""
    acc = trainer.accumulate_grad_batches
    sampler = StepSampler(per_batch, trainer.global_rank, trainer.world_size, lambda: trainer.global_step * acc)
    return DataLoader(DrawDataset(volumes, seed), batch_size=per_batch, sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_worker_init)


def shard(items: Sequence[dict], rank: int, world: int) -> list[dict]:
    """Rank ``rank``'s share of evaluation items, padded to ⌈n/world⌉ with ``weight`` 0 copies; each item carries
    its ``case`` index in ``items`` (what per-case seeds derive from, whatever the number of ranks).

    Every rank runs the same number of batches (DDP needs it) and every case counts exactly once.
    """
    items = list(items)
    mine = [{**items[i], "weight": 1.0, "case": i} for i in range(rank, len(items), world)]
    size = -(-len(items) // world)
    return mine + [{**items[0], "weight": 0.0, "case": 0}] * (size - len(mine))


def make_loaders(volumes, val_dataset, seed: int, per_batch: int, trainer: pl.Trainer, num_workers: int
                 ) -> tuple[DataLoader, DataLoader | None]:
    """This rank's endless step-indexed training loader over ``volumes`` (``draw(index, seed)`` → crops) and its
    validation loader over ``val_dataset`` (this rank's :func:`shard` of the validation cases, one per batch)."""
    train = train_loader(volumes, seed, per_batch, trainer, num_workers)
    val = None if val_dataset is None else DataLoader(val_dataset, batch_size=1, num_workers=min(1, num_workers))
    return train, val
