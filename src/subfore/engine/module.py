"""The LightningModule every run shares: optimiser steps that all ranks take or skip together (decided on the
device), preemption requests agreed at step boundaries, and the collectives and digests that check replicas agree."""

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


class SkippingAdamW(torch.optim.AdamW):
    """AdamW whose step leaves parameters and state exactly as they were when told to skip.

    Before each step the caller sets ``skip``: a 0./1. float32 scalar on the parameters' device. Fused, the
    skip happens on the device (torch's fused kernel reads ``found_inf``, as GradScaler uses it), so nobody
    waits for the flag; GradScaler's own ``found_inf`` (16-mixed) is folded in. After the step ``applied`` is
    1 − the skip that held (a device scalar), what the EMA teacher follows. Not fused, the caller decides on
    the host and calls ``step`` only for a step to take (GradScaler likewise); ``applied`` is then None.
    """

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.skip: torch.Tensor | None = None
        self.applied: torch.Tensor | None = None

    @property
    def fused(self) -> bool:
        return bool(self.defaults.get("fused"))

    def step(self, closure=None):
        if not self.fused:
            self.applied = None
            return super().step(closure)
        scaler_inf = getattr(self, "found_inf", None)  # set by GradScaler.step for this call only
        skip = self.skip
        if scaler_inf is not None:
            # The fused kernels skip only on found_inf == 1 exactly (GradScaler sums over devices).
            inf = (scaler_inf > 0).float()
            skip = inf if skip is None else torch.maximum(skip, inf.to(skip.device))
        if skip is not None:
            self.found_inf = skip
        try:
            out = super().step(closure)
        finally:
            if scaler_inf is not None:
                self.found_inf = scaler_inf  # GradScaler deletes its own attribute afterwards
            elif skip is not None:
                del self.found_inf
        self.applied = None if skip is None else 1.0 - skip
        return out


def adamw(module: pl.LightningModule, params, **kwargs) -> SkippingAdamW:
    """The runs' AdamW: fused where torch has the kernel for the parameters' device, so that a skipped step is
    decided on the device. Not under 16-mixed with ``gradient_clip_val``: Lightning refuses to clip for a fused
    optimiser there (GradScaler unscales inside its step)."""
    trainer = module._trainer
    scaled = trainer is not None and str(trainer.precision) in ("16-mixed", "16")
    clipped = trainer is not None and bool(trainer.gradient_clip_val)
    fused = module.device.type in FUSED_DEVICES and not (scaled and clipped)
    return SkippingAdamW(params, fused=fused, **kwargs)


#: device types with torch's fused AdamW kernel
FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")


class HostCopy:
    """A device scalar on its way to the host: the copy is queued now, ``value`` waits for that copy only."""

    def __init__(self, t: torch.Tensor) -> None:
        self._event = None
        if t.device.type == "cuda":
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = t

    def value(self) -> int:
        if self._event is not None:
            self._event.synchronize()
        return int(self._host)


# The device-side counters of RunModule, in this order (int64).
_SKIPPED, _IN_A_ROW, _TRIPPED_AT, _LAST_BAD, _LAST_RANKS, _THIS_SKIPPED = range(6)


class RunModule(pl.LightningModule):
    """Optimiser steps that all ranks take or skip together, and preemption requests agreed at step boundaries.

    A step whose loss is non-finite on any rank (any micro-batch of it) is skipped on every rank: the
    optimiser, its state and the EMA teacher do not move. It still counts as a step, as AMP's skipped steps do.
    ``max_bad_steps`` such steps in a row stop every rank with the same error.

    Host syncs: the step itself waits for the device nowhere. The skip is decided on the device (fused AdamW's
    ``found_inf``), its counters live there, and they are read, with the logged values, in one transfer at each
    logged step (:meth:`logging_now`) and when a checkpoint is saved: the max_bad_steps error and the warning
    for skipped steps come at those reads. A preemption request (a host flag) is acted on at the step it is
    noted in with one process; with several, ranks agree through the flags all-reduced with the skip flag: at a
    logged step that step's, otherwise the previous step's, read without waiting for the current one (the stop
    comes one step later). Without a fused optimiser (16-mixed with grad clipping) the skip is read each step.
    MAE's visible encoding under masks whose visible count depends on the data (SubFore's foreground, AnatoMask)
    reads one number per step: its longest visible-token count, the ViT's input shape
    (:func:`~subfore.models.mae.visible_layout`); under exact-count random masks (MAE's own) it reads nothing.
    """

    #: validation metrics written to metrics.jsonl: {logged name: (row key, type)}
    val_metrics: dict[str, tuple[str, type]] = {}

    def __init__(self, seed: int, max_bad_steps: int, log_every: int = 1) -> None:
        super().__init__()
        self.row: dict = {}  # this step's metrics.jsonl row, set at logged steps
        self.run_seed = seed
        self.max_bad_steps = max_bad_steps
        self.log_every = log_every
        # As of the last read of the device counters (a logged step or a checkpoint).
        self.skipped_steps = 0
        self.bad_in_a_row = 0
        self.stop_request: StopRequest | None = None  # set by RunControl
        self.preempted = False
        self.stepped = False  # one optimiser step (taken or skipped) has just ended
        self.step_skipped = False  # ... and it was skipped (a non-finite loss on some rank); known at logged steps
        self.step_applied: torch.Tensor | float = 1.0  # for after_step: 1 when the step moved the weights, else 0
        self._counts: torch.Tensor | None = None  # int64 (6,) on the device: see _SKIPPED …
        self._pending_stop: HostCopy | None = None  # several ranks: the previous step's agreed stop count
        self._window_bad: torch.Tensor | None = None
        self._window_loss: list[torch.Tensor] = []
        self._last_window: list[torch.Tensor] = []

    def on_train_start(self) -> None:
        self._init_counts()

    def _init_counts(self) -> None:
        # Once, outside the steps: the counters (restored from a checkpoint, or 0) go to the device.
        self._counts = torch.tensor([self.skipped_steps, self.bad_in_a_row, 0, 0, 0, 0], dtype=torch.int64,
                                    device=self.device)

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

    def step_loss(self) -> torch.Tensor:
        """Mean loss over the micro-batches of the step that just ended: a device scalar (NaN if none)."""
        if not self._last_window:
            return torch.full((), float("nan"), device=self.device)
        return torch.stack(self._last_window).mean()

    def pop_row(self) -> dict:
        """The metrics.jsonl row of the step that just ended ({} at steps that are not logged)."""
        row, self.row = self.row, {}
        return row

    def logging_now(self) -> bool:
        """Whether the step now ending is a logged step (a metrics.jsonl row, one read of the device)."""
        step = self.global_step + 1
        return step == 1 or step % self.log_every == 0

    def after_step(self) -> None:
        """Called after every optimiser step that may have moved the weights; ``step_applied`` (a device scalar,
        or 1.0) is 1 when it did and 0 when it was skipped on the device."""

    def step_ended(self) -> None:
        """Called on every rank once per optimiser step, taken or skipped (``global_step`` not yet advanced)."""

    def log_values(self) -> dict[str, torch.Tensor]:
        """The values of a logged step's row: device scalars, read with the counters in one transfer (every
        rank), or host numbers (taken as they are)."""
        return {"loss": self.step_loss()}

    def make_row(self, values: dict[str, list[float]]) -> dict:
        """The metrics.jsonl row from :meth:`log_values` as read: each key → [rank 0, rank 1, …]."""
        losses = values["loss"]
        return {"loss": sum(losses) / len(losses)}

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        # Run forward and backward on every rank first (DDP reduces gradients there), then decide together.
        loss = optimizer_closure()
        step = self.global_step + 1
        bad = self._window_bad if self._window_bad is not None else torch.zeros((), dtype=torch.bool,
                                                                                device=self.device)
        n_bad, n_stop = bad.long(), None
        if self.trainer.world_size > 1:
            # A fill, not a host copy; all_reduce directly (Lightning's reduce adds a host-blocking barrier).
            stop = torch.full((), int(self._stop_asked()), dtype=torch.int64, device=self.device)
            flags = torch.stack([n_bad, stop])
            torch.distributed.all_reduce(flags)
            n_bad, n_stop = flags[0], flags[1]
        self._last_window, self._window_loss, self._window_bad = self._window_loss, [], None
        self.stepped = True
        skip = n_bad > 0
        self._count(skip, n_bad, step)
        raw = getattr(optimizer, "optimizer", optimizer)
        if isinstance(raw, SkippingAdamW) and raw.fused:
            raw.skip = skip.float()
            optimizer.step(closure=lambda: loss)
            self.step_applied = raw.applied
            self.after_step()
        elif not bool(skip):  # the host decides: one sync per step
            stepped = []
            hook = raw.register_step_post_hook(lambda *_: stepped.append(True))
            try:
                optimizer.step(closure=lambda: loss)
            finally:
                hook.remove()
            if stepped:  # GradScaler calls the optimiser only for a step it takes
                self.step_applied = 1.0
                self.after_step()
        self.step_ended()
        reading = self.logging_now()
        if reading:
            n_stop = self._read(n_stop)
        elif n_stop is not None:
            # Several ranks, no read at this step: act on the previous step's agreed flag, queue this one's.
            pending, self._pending_stop = self._pending_stop, HostCopy(n_stop)
            n_stop = pending.value() if pending is not None else 0
        else:
            n_stop = int(self._stop_asked())
        if n_stop and step < self.trainer.max_steps:  # on the last step, just finish
            self.preempted = True
            self.trainer.should_stop = True
            # Lightning validates before an early stop; a preempted job has no time for that.
            self.trainer.limit_val_batches = 0

    def _count(self, skip: torch.Tensor, n_bad: torch.Tensor, step: int) -> None:
        """Advance the device counters by one step (``skip``: this step is skipped; ``n_bad``: on how many ranks)."""
        if self._counts is None:
            self._init_counts()
        c, s = self._counts, skip.long()
        run = (c[_IN_A_ROW] + 1) * s
        tripped = torch.where((c[_TRIPPED_AT] == 0) & (run >= self.max_bad_steps), step, c[_TRIPPED_AT])
        self._counts = torch.stack([c[_SKIPPED] + s, run, tripped, torch.where(skip, step, c[_LAST_BAD]),
                                    torch.where(skip, n_bad, c[_LAST_RANKS]), s])

    def _read(self, n_stop: torch.Tensor | None) -> int:
        """The one host read of a logged step: counters, stop flag and :meth:`log_values` of every rank. Applies
        the counters (warning, max_bad_steps error), sets ``row``; returns the agreed stop count."""
        values = self.log_values()
        on_device = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
        stop = n_stop if n_stop is not None else torch.zeros((), dtype=torch.int64, device=self.device)
        local = torch.cat([self._counts, stop.reshape(1)]).double()
        if on_device:
            local = torch.cat([local, torch.stack([values[k].detach().reshape(()).double() for k in on_device])])
        if self.trainer.world_size > 1:
            parts = [torch.empty_like(local) for _ in range(self.trainer.world_size)]
            torch.distributed.all_gather(parts, local)  # directly: Lightning's all_gather adds a barrier
            table = torch.stack(parts).tolist()
        else:
            table = [local.tolist()]
        mine = table[self.global_rank]
        self._apply_counts([int(x) for x in mine[:6]])
        per_rank = {k: [r[7 + i] for r in table] for i, k in enumerate(on_device)}
        per_rank.update({k: [v] * len(table) for k, v in values.items() if k not in per_rank})
        self.row = self.make_row(per_rank)
        self._show(self.row)
        self._pending_stop = None
        return int(mine[6]) if n_stop is not None else int(self._stop_asked())

    def _apply_counts(self, counts: list[int]) -> None:
        skipped, in_a_row, tripped_at, last_bad, ranks, this = counts
        new = skipped - self.skipped_steps
        self.skipped_steps, self.bad_in_a_row, self.step_skipped = skipped, in_a_row, bool(this)
        if new and self.global_rank == 0:
            log.warning("non-finite loss at step %d on %d rank(s): step skipped on every rank (%d in a row, %d "
                        "skipped since the last read)", last_bad, ranks, in_a_row, new)
        if tripped_at:
            raise SubforeError(
                f"{self.max_bad_steps} non-finite losses in a row (train.max_bad_steps), reached at step "
                f"{tripped_at}: lower optim.lr, set train.grad_clip, or check the data for NaN")

    def _show(self, row: dict) -> None:
        """The logged step's loss and lr to the loggers (TensorBoard) and the progress bar, from host values."""
        if self.trainer.is_global_zero:
            shown = {"train/loss": row.get("loss"), "lr": self.trainer.optimizers[0].param_groups[0]["lr"]}
            shown = {k: float(v) for k, v in shown.items() if isinstance(v, (int, float))}
            for logger in self.loggers:
                logger.log_metrics(shown, step=self.global_step + 1)
            # The bar shows Lightning's progress_bar_metrics dict; a value logged with self.log would be read
            # from the device at every step.
            self.trainer.progress_bar_metrics.update(shown)

    def _stop_asked(self) -> bool:
        return self.stop_request is not None and self.stop_request.signal is not None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._counts is not None:  # the counters as of this step (a read: a checkpoint copies to the host)
            self._apply_counts([int(x) for x in self._counts.tolist()])
        checkpoint.setdefault("subfore", {}).update(skipped_steps=self.skipped_steps, bad_in_a_row=self.bad_in_a_row)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("subfore", {})
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))
        self._counts = None
