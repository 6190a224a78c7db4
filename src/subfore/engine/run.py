"""The run around the loop: signals, the final checkpoint, replica checks, the metrics file, resume and the Trainer."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from ..dist import launched_layout, slurm_job
from ..errors import SubforeError
from ..io import append_jsonl, load_torch, truncate_jsonl
from ..preempt import STOP, Preempted, StopRequest
from .module import RunModule, module_digest

log = logging.getLogger(__name__)


class RunControl(Callback):
    """Signals, the final checkpoint, replica checks and the metrics file's consistency on resume.

    - SIGTERM/SIGUSR1 set a flag (:class:`StopRequest`); at the next optimiser step every rank agrees, saves
      ``last.ckpt`` at that step and stops (the caller then raises :class:`Preempted`).
    - At the end every rank joins the save of ``last.ckpt`` (a collective under DDP), then ``on_end`` runs
      on rank 0 (export), then all ranks wait for it.
    - Under DDP the weights of every rank are hashed and compared: they must be equal bit for bit.
    """

    def __init__(self, run_dir: Path, on_end: Callable[[], None] | None = None, stop: StopRequest = STOP) -> None:
        self.run_dir = Path(run_dir)
        self.stop = stop
        self.on_end = on_end

    @property
    def last(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    def fit(self, trainer: pl.Trainer, module: RunModule, **fit_kwargs) -> None:
        """``trainer.fit`` with the preemption signals noted (the CLI takes them earlier); raises Preempted."""
        installed = self.stop.install()
        try:
            trainer.fit(module, weights_only=True, **fit_kwargs)
        finally:
            if installed:
                self.stop.restore()
        if module.preempted:
            self.stop.signal = None  # acted on: a later run in this process starts normally
            raise Preempted(f"{self.last}: stopped by a signal at step {trainer.global_step}, checkpoint saved; "
                            f"continue with --resume")

    def on_train_start(self, trainer, module: RunModule) -> None:
        if trainer.is_global_zero:
            # Rows after the checkpoint (or, on a fresh start, of a run that died before its first checkpoint)
            # are rewritten by this run.
            truncate_jsonl(self.run_dir / "metrics.jsonl", trainer.global_step)
        module.stop_request = self.stop  # installed by the CLI or fit(); Lightning's own is never installed

    def on_train_end(self, trainer, module: RunModule) -> None:
        trainer.save_checkpoint(self.last, weights_only=False)  # every rank: the save holds a barrier
        if trainer.world_size > 1:
            self._check_replicas(trainer, module)
        if trainer.is_global_zero and self.on_end is not None:
            self.on_end()
        trainer.strategy.barrier("subfore-end")

    def _check_replicas(self, trainer, module) -> None:
        parts = {name: child for name, child in module.named_children()
                 if any(True for _ in child.parameters(recurse=True))}
        local = torch.tensor([module_digest(c) for c in parts.values()], dtype=torch.int64, device=module.device)
        gathered = module.all_gather(local).cpu()  # (world, parts)
        digests = {name: [f"{int(v):016x}" for v in gathered[:, i]] for i, name in enumerate(parts)}
        if trainer.is_global_zero:
            append_jsonl(self.run_dir / "metrics.jsonl", {"step": trainer.global_step, "replica_digests": digests})
        diverged = [name for name, values in digests.items() if len(set(values)) > 1]
        if diverged:
            raise SubforeError(f"{self.run_dir}: the weights of {', '.join(diverged)} differ between ranks at step "
                               f"{trainer.global_step} (see metrics.jsonl); this is a bug, please report it")


class MetricsWriter(Callback):
    """Rank 0 appends to RUN_DIR/metrics.jsonl the module's row after each logged optimiser step
    (:meth:`RunModule.pop_row`) and its validation metrics (:attr:`RunModule.val_metrics`) after each validation."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"

    def on_train_batch_end(self, trainer, module: RunModule, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero and module.stepped:
            row = module.pop_row()
            if row:
                if module.step_skipped:  # its loss is the one that was not finite somewhere: not a number to plot
                    row.update(loss=None, skipped=True)
                append_jsonl(self.path, finite({"step": trainer.global_step, **row}))

    def on_validation_end(self, trainer, module: RunModule) -> None:
        m = trainer.callback_metrics
        if trainer.is_global_zero and not trainer.sanity_checking and module.val_metrics \
                and all(name in m for name in module.val_metrics):
            row = {key: kind(float(m[name])) for name, (key, kind) in module.val_metrics.items()}
            append_jsonl(self.path, finite({"step": trainer.global_step, **row}))


def finite(value):
    """``value`` with every NaN or ±inf float (in dicts and lists) as None: metrics.jsonl stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def resolve_resume(run_dir: str | Path, resume: str | Path | None) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run.

    resume: ``None`` (fresh; refused when RUN_DIR already holds a checkpoint, so two runs never mix),
    ``"last"`` (RUN_DIR/checkpoints/last.ckpt, which must exist), ``"auto"`` (last.ckpt if it exists, else
    fresh: for job scripts and elastic restarts), or a checkpoint path.
    """
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if resume is None:
        if last.exists():
            raise SubforeError(f"{last}: this run_dir already holds a run; continue it with --resume, or choose "
                               f"another run_dir")
        return None
    if str(resume) == "auto":
        return last if last.exists() else None
    path = last if str(resume) == "last" else Path(resume)
    if not path.exists():
        raise SubforeError(f"{path}: no checkpoint to resume from")
    # Read once here, weights_only, so that a file from elsewhere is refused in one line before Lightning opens it
    # (which fit() also does with weights_only=True).
    load_torch(path, "checkpoint to resume from")
    return path


def device_for(accelerator: str) -> str:
    """The torch device that Lightning's ``accelerator`` setting trains on (for inference after training)."""
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return "cuda"
    if accelerator in ("mps", "auto") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_precision(precision: str) -> str:
    """'auto' → 'bf16-mixed' on a CUDA GPU that supports it, else '32'."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32"


class _NoAdvert(logging.Filter):
    """Drops Lightning's 'Tip: … litlogger' line: a run's console shows this project's lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def make_trainer(run_dir: Path, t, callbacks: list, validate: bool) -> pl.Trainer:
    """The Lightning Trainer every run uses: step-based, validation every ``t.val_every`` optimiser steps.

    Loaders are sharded by rank here (step-indexed draws), so Lightning's DistributedSampler is off. Under
    SLURM, Lightning's own requeue handler is off too: RunControl saves on SIGUSR1/SIGTERM at a step boundary
    and the job script requeues (configs/slurm/pretrain.sbatch).
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment

    plugins = [SLURMEnvironment(auto_requeue=False)] if slurm_job() else None
    # Lightning prints through the handlers of its two top loggers; a filter there sees every one of its lines.
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _NoAdvert) for f in handler.filters):
                handler.addFilter(_NoAdvert())
    devices, num_nodes = t.devices, t.num_nodes
    external = launched_layout()
    if external is not None and devices == "auto":
        # Started by torchrun or srun: one process per device, on as many nodes as the launcher used.
        devices, nodes = external
        num_nodes = nodes if num_nodes == 1 else num_nodes
    trainer = pl.Trainer(
        default_root_dir=run_dir,
        accelerator=t.accelerator,
        devices=devices,
        num_nodes=num_nodes,
        plugins=plugins,
        precision=resolve_precision(t.precision),
        max_steps=t.max_steps,
        max_epochs=None,
        accumulate_grad_batches=t.accumulate,
        gradient_clip_val=t.grad_clip,
        use_distributed_sampler=False,
        logger=TensorBoardLogger(run_dir, name="tensorboard", version=""),
        callbacks=callbacks,
        log_every_n_steps=t.log_every,
        # Lightning counts validation intervals in micro-batches; ours are optimiser steps.
        check_val_every_n_epoch=None if validate else 1,
        val_check_interval=min(t.val_every, t.max_steps) * t.accumulate if validate else None,
        num_sanity_val_steps=0,
        limit_val_batches=None if validate else 0,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
    )
    # Lightning's SIGTERM handler broadcasts from inside the handler on whichever rank got the signal, which
    # deadlocks DDP (rank 0 in broadcast, the others in a barrier); STOP handles the signals on every rank.
    trainer._signal_connector.register_signal_handlers = lambda: None
    return trainer
