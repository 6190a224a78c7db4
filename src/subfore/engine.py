"""What every training run shares: step-indexed data, rank-agreed optimiser steps, preemption, the Trainer.

The data a run sees is a pure function of (seed, global draw index): draw ``g`` takes volume
``perm_e[g mod n]`` of epoch ``e = g div n`` and seeds the random transforms from (seed, g). Micro-batch
``b`` of rank ``r`` holds draws ``(b·W + r)·P … (b·W + r)·P + P − 1`` (W ranks, P volumes per micro-batch),
so ranks and loader workers never draw the same crop, ``num_workers`` changes nothing, and a resumed run
starts again at micro-batch ``global_step · accumulate`` — bit-identical to the run that was not stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from monai.data import DataLoader
from monai.data.utils import worker_init_fn as monai_worker_init
from torch.utils.data import Dataset, Sampler

from .errors import SubforeError
from .preempt import PREEMPT_SIGNALS, STOP, StopRequest, Preempted  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence; the same on every platform)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint64)[0] >> np.uint64(1))


# --- data -------------------------------------------------------------------------------------------
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


def check_fill(n_volumes: int, batch_size: int, samples_per_volume: int, world: int, where: str) -> int:
    """Volumes per micro-batch and rank; fail when the data cannot fill one batch on every rank."""
    per_batch = batch_size // samples_per_volume
    if n_volumes < per_batch * world:
        raise SubforeError(
            f"{where}: {n_volumes} volume(s) cannot fill one batch per rank: train.batch_size={batch_size} crops "
            f"with data.samples_per_volume={samples_per_volume} needs {per_batch} volume(s) on each of {world} "
            f"rank(s), {per_batch * world} in all"
        )
    return per_batch


def train_loader(volumes, seed: int, per_batch: int, trainer: pl.Trainer, num_workers: int) -> DataLoader:
    """The endless, step-indexed training loader of one rank (resumes at ``global_step · accumulate``)."""
    acc = trainer.accumulate_grad_batches
    sampler = StepSampler(per_batch, trainer.global_rank, trainer.world_size, lambda: trainer.global_step * acc)
    return DataLoader(DrawDataset(volumes, seed), batch_size=per_batch, sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_worker_init)


def shard(items: Sequence[dict], rank: int, world: int) -> list[dict]:
    """Rank ``rank``'s share of evaluation items, padded to ⌈n/world⌉ with ``weight`` 0 copies.

    Every rank runs the same number of batches (DDP needs it) and every case counts exactly once.
    """
    mine = [{**item, "weight": 1.0} for item in list(items)[rank::world]]
    size = -(-len(items) // world)
    return mine + [{**items[0], "weight": 0.0}] * (size - len(mine))


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


# --- steps that every rank takes or skips together -----------------------------------------------------
class RunModule(pl.LightningModule):
    """Optimiser steps that all ranks take or skip together, and preemption requests agreed at step boundaries.

    A step whose loss is non-finite on any rank (any micro-batch of it) is skipped on every rank: the
    optimiser, its state and ``after_step`` (the EMA teacher) do not move. It still counts as a step, as
    AMP's skipped steps do. ``max_bad_steps`` such steps in a row stop every rank with the same error.
    """

    def __init__(self, seed: int, max_bad_steps: int) -> None:
        super().__init__()
        self.run_seed = seed
        self.max_bad_steps = max_bad_steps
        self.skipped_steps = 0
        self.bad_in_a_row = 0
        self.stop_request: StopRequest | None = None  # set by RunControl
        self.preempted = False
        self.stepped = False  # one optimiser step (taken or skipped) has just ended
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


# --- the run around the loop ------------------------------------------------------------------------
def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the rows of ``path`` up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    tmp.replace(path)


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
            trainer.fit(module, **fit_kwargs)
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
        trainer.save_checkpoint(self.last)  # every rank: the save holds a barrier
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


def gather_scalars(module: pl.LightningModule, values: Sequence[torch.Tensor]) -> list[list[float]]:
    """Every rank's value of each scalar: ``[[rank 0, rank 1, …] for each value]`` (a collective)."""
    local = torch.stack([torch.as_tensor(v).detach().double().to(module.device) for v in values])
    gathered = module.all_gather(local).reshape(-1, len(values)).cpu()
    return [[float(x) for x in gathered[:, i]] for i in range(len(values))]


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


def make_trainer(run_dir: Path, t, callbacks: list, validate: bool) -> pl.Trainer:
    """The Lightning Trainer every run uses: step-based, validation every ``t.val_every`` optimiser steps.

    Loaders are sharded by rank here (step-indexed draws), so Lightning's DistributedSampler is off. Under
    SLURM, Lightning's own requeue handler is off too: RunControl saves on SIGUSR1/SIGTERM at a step boundary
    and the job script requeues (configs/slurm/pretrain.sbatch).
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment

    plugins = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else None
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


def launched_layout() -> tuple[int, int] | None:
    """(processes per node, nodes) when torchrun or SLURM's srun started several processes, else None."""
    env = os.environ
    world, local = env.get("WORLD_SIZE", ""), env.get("LOCAL_WORLD_SIZE", "")
    if world.isdigit() and local.isdigit() and int(world) > 1:
        return int(local), max(1, int(world) // int(local))
    from lightning.fabric.plugins.environments import SLURMEnvironment

    tasks, nodes = env.get("SLURM_NTASKS", ""), env.get("SLURM_NNODES", "")
    if SLURMEnvironment.detect() and tasks.isdigit() and nodes.isdigit() and int(tasks) > 1:
        return max(1, int(tasks) // int(nodes)), int(nodes)
    return None


def launch_rank() -> int:
    """This process's global rank as the launcher (torchrun, SLURM) set it, before any process group exists."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def first_rank_prepares(ready: Path, prepare: Callable[[], None], timeout_s: float = 3600.0) -> None:
    """Rank 0 runs ``prepare`` unless ``ready`` exists; other ranks wait for ``ready`` to appear."""
    import time

    if ready.exists():
        return
    if launch_rank() == 0:
        prepare()
        return
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if time.monotonic() > deadline:
            raise SubforeError(f"{ready}: rank 0 did not write it within {timeout_s:.0f} s")
        time.sleep(1.0)
