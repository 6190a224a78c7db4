"""The LightningModule every run shares: optimiser steps that all ranks take or skip together, preemption
requests agreed at step boundaries, and the collectives and digests that check replicas agree."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence

import lightning.pytorch as pl
import torch

from ..errors import SubforeError
from ..preempt import StopRequest
from .sampling import mix_seed

log = logging.getLogger(__name__)


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """LR multiplier: linear from 0 to 1 over ``warmup`` steps, then cosine down to ``floor`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def reduce_sum(module: pl.LightningModule, value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over every rank (itself in one process)."""
    if module.trainer.world_size == 1:
        return value
    return module.trainer.strategy.reduce(value, reduce_op="sum")


def tensor_digest(t: torch.Tensor) -> torch.Tensor:
    """A position-sensitive float64 fingerprint of a tensor, computed where it lives (no host copy)."""
    flat = t.detach().double().flatten()
    return (flat * torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)).sum()


def module_digest(module: torch.nn.Module) -> int:
    """A 63-bit hash of a module's parameters and buffers, exact to the bit."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def gather_scalars(module: pl.LightningModule, values: Sequence[torch.Tensor]) -> list[list[float]]:
    """Every rank's value of each scalar: ``[[rank 0, rank 1, …] for each value]`` (a collective)."""
    local = torch.stack([torch.as_tensor(v).detach().double().to(module.device) for v in values])
    gathered = module.all_gather(local).reshape(-1, len(values)).cpu()
    return [[float(x) for x in gathered[:, i]] for i in range(len(values))]


class RunModule(pl.LightningModule):
    """Optimiser steps that all ranks take or skip together, and preemption requests agreed at step boundaries.

    A step whose loss is non-finite on any rank (any micro-batch of it) is skipped on every rank: the
    optimiser, its state and ``after_step`` (the EMA teacher) do not move. It still counts as a step, as
    AMP's skipped steps do. ``max_bad_steps`` such steps in a row stop every rank with the same error.
    """

    #: validation metrics written to metrics.jsonl: {logged name: (row key, type)}
    val_metrics: dict[str, tuple[str, type]] = {}

    def __init__(self, seed: int, max_bad_steps: int) -> None:
        super().__init__()
        self.row: dict = {}  # this step's metrics.jsonl row, set in step_ended at logged steps
        self.run_seed = seed
        self.max_bad_steps = max_bad_steps
        self.skipped_steps = 0
        self.bad_in_a_row = 0
        self.stop_request: StopRequest | None = None  # set by RunControl
        self.preempted = False
        self.stepped = False  # one optimiser step (taken or skipped) has just ended
        self.step_skipped = False  # ... and it was skipped (a non-finite loss on some rank)
        self._window_bad: torch.Tensor | None = None
        self._window_loss: list[torch.Tensor] = []
        self._last_window: list[torch.Tensor] = []

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.stepped = False
        # Stochastic layers (dropout, drop-path) draw from the global RNG: seed it per micro-batch so that a
        # resumed run draws what the uninterrupted one drew.
        torch.manual_seed(mix_seed(self.run_seed, self.global_rank, self.global_step, self.micro_batch, 0xD5))

    def note_loss(self, loss: torch.Tensor, shown: torch.Tensor | None = None) -> None:
        """Record one micro-batch's loss (call from training_step); ``shown`` is what step_loss averages."""
        bad = ~torch.isfinite(loss.detach())
        self._window_bad = bad if self._window_bad is None else self._window_bad | bad
        self._window_loss.append((loss if shown is None else shown).detach().float())

    @property
    def micro_batch(self) -> int:
        """Index of the current micro-batch within its optimiser step (0 … accumulate − 1)."""
        return len(self._window_loss)

    def step_loss(self) -> float:
        """Mean loss over the micro-batches of the step that just ended."""
        return float(torch.stack(self._last_window).mean()) if self._last_window else float("nan")

    def pop_row(self) -> dict:
        """The metrics.jsonl row of the step that just ended ({} at steps that are not logged)."""
        row, self.row = self.row, {}
        return row

    def after_step(self) -> None:
        """Called after an optimiser step that was taken (not after a skipped one)."""

    def step_ended(self) -> None:
        """Called on every rank once per optimiser step, taken or skipped (``global_step`` not yet advanced)."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        # Run forward and backward on every rank first (DDP reduces gradients there), then decide together.
        loss = optimizer_closure()
        bad = self._window_bad if self._window_bad is not None else torch.tensor(False)
        flags = torch.stack([bad.float().to(self.device),
                             torch.tensor(float(self._stop_asked()), device=self.device)])
        n_bad, n_stop = reduce_sum(self, flags).tolist()
        self._last_window, self._window_loss, self._window_bad = self._window_loss, [], None
        self.stepped = True
        self.step_skipped = bool(n_bad)
        if n_stop and self.global_step + 1 < self.trainer.max_steps:  # on the last step, just finish
            self.preempted = True
            self.trainer.should_stop = True
            # Lightning validates before an early stop; a preempted job has no time for that.
            self.trainer.limit_val_batches = 0
        if n_bad:
            self.skipped_steps += 1
            self.bad_in_a_row += 1
            if self.global_rank == 0:
                log.warning("non-finite loss at step %d on %d rank(s): step skipped on every rank (%d in a row)",
                            self.global_step + 1, int(n_bad), self.bad_in_a_row)
            if self.bad_in_a_row >= self.max_bad_steps:
                raise SubforeError(
                    f"{self.bad_in_a_row} non-finite losses in a row (train.max_bad_steps): lower optim.lr, "
                    f"set train.grad_clip, or check the data for NaN"
                )
        else:
            self.bad_in_a_row = 0
            optimizer.step(closure=lambda: loss)
            self.after_step()
        self.step_ended()

    def _stop_asked(self) -> bool:
        return self.stop_request is not None and self.stop_request.signal is not None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint.setdefault("subfore", {}).update(skipped_steps=self.skipped_steps, bad_in_a_row=self.bad_in_a_row)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("subfore", {})
        self.skipped_steps = state.get("skipped_steps", 0)
        self.bad_in_a_row = state.get("bad_in_a_row", 0)
