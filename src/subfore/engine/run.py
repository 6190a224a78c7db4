"""The run around the loop: signals, the final checkpoint, replica checks, the metrics file, resume and the Trainer."""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy

from ..dist import launched_layout, slurm_job
from ..errors import SubforeError
from ..io import append_jsonl, atomic_path, check_output, load_torch, truncate_jsonl
from ..preempt import STOP, Preempted, StopRequest
from .module import RunModule, module_digest

log = logging.getLogger(__name__)


class RunControl(Callback):
    """Signals, the final checkpoint, replica checks and the metrics file's consistency on resume.

    - SIGTERM/SIGUSR1 set a flag (:class:`StopRequest`); at the next optimiser step every rank agrees, saves
      ``last.ckpt`` at that step and stops (the caller then raises :class:`Preempted`). With several processes a
      signal between logged steps takes effect one step later (the previous step's agreed flag, read without a
      device sync).
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


COMMANDS = {"pretrain": "--init-from", "finetune": "--pretrained"}  # each command's way to start from weights


def resolve_resume(run_dir: str | Path, resume: str | Path | None, command: str | None = None) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run (:func:`read_resume` without the state's shapes)."""
    return read_resume(run_dir, resume, command).path


def read_resume(run_dir: str | Path, resume: str | Path | None, command: str | None = None) -> ResumePoint:
    """The checkpoint to continue from (``path`` None for a fresh run), read and checked before anything is built.

    resume: ``None`` (fresh; refused when RUN_DIR already holds a checkpoint, so two runs never mix),
    ``"last"`` (RUN_DIR/checkpoints/last.ckpt, which must exist), ``"auto"`` (last.ckpt if it exists, else
    fresh: for job scripts and elastic restarts), or a checkpoint path.
    command: ``"pretrain"`` or ``"finetune"``: the file must be a training checkpoint of that command (checked in one
    line naming the file); :meth:`ResumePoint.check_fits` then compares its weights with the network the config
    builds.
    """
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if resume is None:
        if last.exists():
            raise SubforeError(f"{last}: this run_dir already holds a run; continue it with --resume, or choose "
                               f"another run_dir")
        return ResumePoint(None)
    if str(resume) == "auto":
        if not last.exists():
            return ResumePoint(None)
        path = last
    else:
        path = last if str(resume) == "last" else Path(resume)
    if not path.exists():
        raise SubforeError(f"{path}: no checkpoint to resume from")
    # Read once here, weights_only, so that a file from elsewhere is refused in one line before Lightning opens it
    # (which fit() also does with weights_only=True).
    ckpt = load_torch(path, "checkpoint to resume from")
    if command is None:
        return ResumePoint(path)
    check_kind(path, ckpt, command)
    shapes = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items() if isinstance(v, torch.Tensor)}
    return ResumePoint(path, shapes, ckpt["hyper_parameters"]["config"].get("model"))


def checkpoint_kind(ckpt) -> str | None:
    """``pretrain``/``finetune`` for a training checkpoint of that subfore command, ``lightning`` for another
    Lightning checkpoint, ``weights`` for a bare state_dict (encoder.pt), None for anything else."""
    if not isinstance(ckpt, dict):
        return None
    if not isinstance(ckpt.get("state_dict"), dict) or "global_step" not in ckpt:
        return "weights" if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()) else None
    hp = ckpt.get("hyper_parameters")
    config = hp.get("config") if isinstance(hp, dict) else None
    if not isinstance(config, dict):
        return "lightning"
    if hp.get("kind") == "subfore-finetune":
        return "finetune"
    # Pretraining checkpoints carry no kind: their config is the one with a masking section.
    return "pretrain" if "masking" in config and hp.get("kind") is None else "lightning"


def check_kind(path: Path, ckpt, command: str) -> None:
    """Refuse, in one line naming ``path``, a file that is not a training checkpoint of ``subfore COMMAND``."""
    kind = checkpoint_kind(ckpt)
    if kind == command:
        return
    nothing = f"so a subfore {command} run has nothing to resume from it"
    if kind == "weights":
        problem = f"a weights file (a bare state_dict), not a training checkpoint, {nothing}; to start from these " \
                  f"weights, give {COMMANDS[command]} {path}"
    elif kind in COMMANDS:
        run = path.parent.parent if path.parent.name == "checkpoints" else Path("RUN_DIR")
        start = f"--pretrained {run / 'encoder.pt'}" if command == "finetune" else f"--init-from {path}"
        problem = f"a checkpoint of subfore {kind}, not of subfore {command}, which resumes only its own runs; to " \
                  f"start from its weights, give {start}"
    elif kind == "lightning":
        problem = f"a Lightning checkpoint without a subfore config in its hyper_parameters, {nothing}"
    else:
        held = f"a {type(ckpt).__name__}" if not isinstance(ckpt, dict) else "a dict without state_dict and step"
        problem = f"not a training checkpoint (it holds {held}), {nothing}"
    raise SubforeError(f"{path}: {problem}")


class ResumePoint:
    """The checkpoint a run continues from (``path``; None: a fresh run), its weights' shapes and recorded model."""

    def __init__(self, path: Path | None, shapes: dict[str, tuple[int, ...]] | None = None,
                 model: dict | None = None) -> None:
        self.path = path
        self.shapes = shapes or {}
        self.model = model

    def check_fits(self, module: torch.nn.Module, model_name: str) -> None:
        """Refuse, in one line naming the file, a checkpoint whose weights do not fit ``module`` (the network this
        config builds) tensor for tensor: what Lightning's strict load would stop on, before any data is read."""
        if self.path is None:
            return
        mine = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        theirs = self.shapes
        missing = [k for k in mine if k not in theirs]
        extra = [k for k in theirs if k not in mine]
        reshaped = [k for k in mine if k in theirs and mine[k] != theirs[k]]
        if not (missing or extra or reshaped):
            return
        recorded = (self.model or {}).get("name")
        parts = [f"model.name {recorded} in the checkpoint, {model_name} here"] \
            if recorded and recorded != model_name else []
        counts = [f"{len(names)} {what}" for names, what in ((reshaped, "of another shape"),
                                                             (missing, "missing from the checkpoint"),
                                                             (extra, "not in this network")) if names]
        if reshaped:
            example = f"{reshaped[0]} is {list(theirs[reshaped[0]])} in the checkpoint, {list(mine[reshaped[0]])} here"
        else:
            example = f"{missing[0]} missing from the checkpoint" if missing else f"{extra[0]} not in this network"
        parts.append(f"tensors: {', '.join(counts)}; e.g. {example}")
        raise SubforeError(f"{self.path}: its weights do not fit the network this config builds "
                           f"({'; '.join(parts)}); resume with the config of the run that wrote it (its config.yaml)")


def check_run_dir(run_dir: str | Path) -> Path:
    """Refuse, before any work, a run_dir that cannot hold a run: a file, a folder under a file, one of the run's
    own folders (checkpoints, tensorboard) that is a file, or a place this process cannot write. Creates nothing."""
    path = check_output(run_dir, "folder", "run_dir")
    for name in ("checkpoints", "tensorboard", "snapshots"):
        sub = path / name
        if sub.exists() and not sub.is_dir():
            raise SubforeError(f"run_dir {path}: {sub} is a file, where the run writes its {name} folder")
    return path


class RunFolder:
    """What a run adds to its folder, taken away again when the run fails before it saved a checkpoint.

    Made just before the run's first write (config.yaml, the TensorBoard log); used as a context manager around the
    rest. On an exception (not a preemption, which saved its checkpoint; not Ctrl-C) with no checkpoint saved or
    changed by this run, every file and folder that was not there when it was made is removed (a run folder, and the
    parents of it, that the run created go too when empty; in folders that were already there, only inside the run's
    own: checkpoints, tensorboard, snapshots), and the files of its top level that it rewrote
    (config.yaml, metrics.jsonl) get their earlier bytes back: a rerun finds the folder as it was. Nothing else that
    was there before (a resumed run's files) is touched, nor ``keep`` (a data cache or phantoms inside the run
    folder); after a checkpoint everything stays, for --resume. ``owner``: False on ranks other than 0, which change
    nothing.
    """

    SAVED_BYTES = 16 << 20  # top-level files up to this size are kept in memory to be put back
    #: the top-level files a run rewrites (put back after a failure) and the folders it writes into (looked into);
    #: other files and folders that were there stay as they are, even in a run_dir shared with other work ('.')
    REWRITTEN = ("config.yaml", "metrics.jsonl", "init_load.txt", "pretrained_load.txt", "probe_curve.png")
    WRITTEN_INTO = ("checkpoints", "tensorboard", "snapshots", "lightning_logs")

    def __init__(self, run_dir: str | Path, keep: Iterable[str | Path | None] = ()) -> None:
        self.run_dir = Path(run_dir)
        self.keep = [Path(k).resolve() for k in keep if k]
        self.owner = True
        self.created: list[Path] = []  # the run folder and its parents that do not exist yet, deepest first
        p = self.run_dir
        while not p.exists() and p != p.parent:
            self.created.append(p)
            p = p.parent
        self.before = self._paths()
        self.checkpoints = self._checkpoints()
        self.saved = {name: p.read_bytes() for name in self.REWRITTEN if (p := self.run_dir / name).is_file()
                      and not p.is_symlink() and p.stat().st_size <= self.SAVED_BYTES}

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is not None and issubclass(kind, Exception) and not issubclass(kind, Preempted) and self.owner \
                and self._checkpoints().items() <= self.checkpoints.items():
            try:
                self._remove_added()
            except OSError as err:  # the run's own error is the one to report
                log.warning("%s: could not remove what the failed run wrote (%s)", self.run_dir, err)
        return False

    def _kept(self, path: Path) -> bool:
        """Is ``path`` one of ``keep``, or a folder holding one?"""
        p = path.resolve()
        return any(k == p or p in k.parents for k in self.keep)

    def _paths(self) -> set[str]:
        out: set[str] = set()
        for root, dirs, files in os.walk(self.run_dir):
            out.update(os.path.relpath(os.path.join(root, name), self.run_dir) for name in dirs + files)
            dirs[:] = [d for d in dirs if not any(Path(root, d).resolve() == k for k in self.keep)
                       and (Path(root) != self.run_dir or d in self.WRITTEN_INTO)]
        return out

    def _checkpoints(self) -> dict[str, tuple[int, int, int]]:
        found = {}
        for p in sorted((self.run_dir / "checkpoints").glob("*.ckpt")):
            try:
                st = p.stat()
            except OSError:
                continue
            found[p.name] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return found

    def _remove_added(self) -> None:
        for root, dirs, files in os.walk(self.run_dir):
            for name in list(dirs):
                p = Path(root, name)
                if os.path.relpath(p, self.run_dir) in self.before or self._kept(p):
                    if p.resolve() in self.keep or p.is_symlink() or (
                            Path(root) == self.run_dir and name not in self.WRITTEN_INTO):
                        dirs.remove(name)  # a kept path, a link the walk does not follow, or not the run's
                    continue
                dirs.remove(name)
                if p.is_symlink():
                    p.unlink()
                else:
                    shutil.rmtree(p)
            for name in files:
                p = Path(root, name)
                if os.path.relpath(p, self.run_dir) not in self.before and not self._kept(p):
                    p.unlink(missing_ok=True)
        for name, data in self.saved.items():
            p = self.run_dir / name
            if not p.is_file() or p.read_bytes() != data:
                with atomic_path(p) as tmp:
                    tmp.write_bytes(data)
        for folder in self.created:  # deepest first; a folder something else now uses stays
            try:
                folder.rmdir()
            except OSError:
                break


def device_for(accelerator: str) -> str:
    """The torch device that Lightning's ``accelerator`` setting trains on (for inference after training)."""
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return "cuda"
    if accelerator in ("mps", "auto") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """Lightning's precision for ``train.precision``: 'auto' → 'bf16-mixed' where the run computes on a CUDA GPU
    that supports it (``accelerator`` auto, gpu or cuda), else '32' (a CPU run stays fp32 on a machine with a GPU)."""
    if precision != "auto":
        return precision
    if device_for(accelerator) == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32"


# Lightning's precision names → the autocast of inference (predict_volume's ``precision``).
_INFERENCE = {"bf16-mixed": "bf16", "bf16-true": "bf16", "bf16": "bf16", "16-mixed": "fp16", "16-true": "fp16",
              "16": "fp16", "32": "32", "32-true": "32", "64": "32", "64-true": "32"}


def autocast_of(precision: str) -> str:
    """Inference's autocast (``32``, ``bf16`` or ``fp16``) for a Lightning precision ('bf16-mixed', '16-mixed', …)."""
    return _INFERENCE.get(str(precision), "32")


def inference_precision(precision: str, accelerator: str = "auto") -> str:
    """The autocast that inference uses for a run of ``train.precision`` on ``accelerator``, so that validation,
    the probe and predict compute as the training step did."""
    return autocast_of(resolve_precision(str(precision), accelerator))


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
        precision=resolve_precision(t.precision, t.accelerator),
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
        # cuDNN autotuning pays off for fixed-size 3D crops; it only applies where cuDNN runs.
        benchmark=device_for(t.accelerator) == "cuda",
    )
    if isinstance(trainer.strategy, DDPStrategy):
        # The process group's timeout bounds every collective wait, rank 0's side work (the probe) included.
        # Lightning reads it when the group is made (setup_distributed, at fit), after this.
        if not hasattr(trainer.strategy, "_timeout"):
            raise RuntimeError("this Lightning's DDPStrategy has no _timeout; train.timeout_min cannot be applied")
        trainer.strategy._timeout = timedelta(minutes=t.timeout_min)
    # Lightning's SIGTERM handler broadcasts from inside the handler on whichever rank got the signal, which
    # deadlocks DDP (rank 0 in broadcast, the others in a barrier); STOP handles the signals on every rank.
    trainer._signal_connector.register_signal_handlers = lambda: None
    return trainer
