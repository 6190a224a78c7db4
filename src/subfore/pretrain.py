"""Masked-image-modelling pretraining on Lightning: one module for every backbone and masking strategy.

    >>> from subfore.config import load_config
    >>> from subfore.pretrain import pretrain
    >>> pretrain(load_config("configs/pretrain/demo_cpu.yaml", ["train.max_steps=20"]))
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from monai.data import DataLoader

from .config import PretrainConfig, dump_config
from .data.datalist import load_datalists
from .data.dataset import make_dataset
from .data.transforms import center_transforms, pretrain_transforms
from .errors import SubforeError
from .masking import (
    EMPTY_MASKS,
    REGISTRY,
    ForegroundMask,
    RandomMask,
    apply_mask,
    foreground_grid,
    make_generator,
    masked_l1,
    random_grid,
)
from .masking.foreground import parse_threshold
from .masking.teacher import TeacherGuidedMask, ema_momentum, ranking_loss, spearman
from .models import build_backbone, check_roi, encoder_state, save_atomic

log = logging.getLogger(__name__)


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """LR multiplier: linear from 0 to 1 over ``warmup`` steps, then cosine down to ``floor`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_precision(precision: str) -> str:
    """'auto' → 'bf16-mixed' on a CUDA GPU that supports it, else '32'."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32"


class MaskedImageModel(pl.LightningModule):
    """Reconstruct masked subvolumes: x → mask → apply_mask → backbone → masked L1 against x."""

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters({"config": cfg.model_dump(mode="json")})
        m, mk = cfg.model, cfg.masking
        check_roi(m.name, cfg.data.roi, mk.subvolume_size)
        self.channels = cfg.data.channels
        self.predicts_loss = mk.strategy == "hpm"
        # HPM's loss predictor is one extra output channel, pooled per subvolume.
        self.net = build_backbone(
            m.name, self.channels, self.channels + int(self.predicts_loss), cfg.data.roi, m.feature_size, m.use_v2,
            m.checkpointing, m.hidden_size, m.mlp_dim, m.num_heads, m.dropout,
        )
        self.mask_token = torch.nn.Parameter(torch.zeros(self.channels)) if mk.fill == "token" else None
        window = cfg.data.preset_obj().window
        thr = mk.threshold_kwargs()
        self.threshold = parse_threshold(thr.get("threshold"), thr.get("threshold_hu"), window)
        options = dict(mk.options)
        cls = REGISTRY[mk.strategy]
        if issubclass(cls, (RandomMask, ForegroundMask)):
            options.setdefault("exact", mk.exact)
        if issubclass(cls, ForegroundMask):
            options.update(threshold=self.threshold, window=window)
        if issubclass(cls, TeacherGuidedMask):
            options.update(threshold=self.threshold, window=window, gate=mk.gate, r0=mk.r0, rT=mk.rT,
                           schedule=mk.schedule)
        try:
            self.masker = make_generator(mk.strategy, ratio=mk.ratio, size=mk.subvolume_size, **options)
        except ValueError as exc:
            raise SubforeError(f"masking: {exc}") from None
        self.teacher = None
        if isinstance(self.masker, TeacherGuidedMask):
            # The EMA teacher: a frozen copy of the student, saved in checkpoints with the module's state.
            self.teacher = copy.deepcopy(self.net).requires_grad_(False).eval()
            self.masker.scorer = self.teacher_scores
            self.masker.total_steps = cfg.train.max_steps
        self._rng: torch.Generator | None = None
        self._rng_state: torch.Tensor | None = None
        self.bad_in_a_row = 0
        self.skipped_steps = 0
        self.fallbacks_total = 0
        self.last: dict = {}

    # --- reproducible masks -------------------------------------------------------------------
    def mask_rng(self) -> torch.Generator:
        """A generator on the model's device, seeded per rank, restored from checkpoints."""
        if self._rng is None or self._rng.device.type != self.device.type:
            self._rng = torch.Generator(device=self.device)
            self._rng.manual_seed(self.cfg.seed * 1_000_003 + self.global_rank)
            if self._rng_state is not None:
                if self.trainer.world_size == 1:
                    self._rng.set_state(self._rng_state)
                else:
                    # The checkpoint holds rank 0's state only: re-seed every rank from (seed, rank, step) instead.
                    self._rng.manual_seed(self.cfg.seed * 1_000_003 + self.global_rank + 7_919 * self.global_step)
                self._rng_state = None
        return self._rng

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["subfore"] = {
            "mask_rng": self.mask_rng().get_state(),
            "skipped_steps": self.skipped_steps,
            "fallbacks_total": int(self.fallbacks_total),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("subfore", {})
        self._rng_state = state.get("mask_rng")
        self._rng = None
        self.skipped_steps = state.get("skipped_steps", 0)
        self.fallbacks_total = state.get("fallbacks_total", 0)

    # --- the teacher ----------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def per_subvolume(self, voxels: torch.Tensor) -> torch.Tensor:
        """Mean over each subvolume and channel: (B, C, D, H, W) → (B, nz, ny, nx)."""
        s = self.masker.size
        return F.avg_pool3d(voxels.float(), s, s).mean(1)

    @torch.no_grad()
    def teacher_scores(self, x: torch.Tensor, candidates: torch.Tensor, generator) -> torch.Tensor:
        """Per-subvolume difficulty (B, nz, ny, nx) from the EMA teacher; ``-inf`` where it gave no score.

        AnatoMask: L1 error of the teacher's reconstruction under a random ρ mask of the candidates
        (the same L1 target the student trains on). HPM: the teacher's predicted loss on the unmasked input.
        """
        if self.predicts_loss:
            return self.per_subvolume(self.teacher(x)[:, self.channels :])
        m = random_grid(tuple(candidates.shape), self.masker.ratio, x.device, generator, True, candidates)
        pred = self.teacher(apply_mask(x, m, self._fill(), generator=generator))[:, : self.channels]
        return self.per_subvolume((pred - x).abs()).masked_fill(~m, float("-inf"))

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.teacher is not None:
            mk = self.cfg.masking
            m = ema_momentum(self.global_step, self.cfg.train.max_steps, mk.ema_momentum, mk.ema_momentum_end,
                             mk.ema_ramp)
            with torch.no_grad():
                t, s = list(self.teacher.parameters()), list(self.net.parameters())
                torch._foreach_lerp_(t, s, 1.0 - m)

    # --- the step -----------------------------------------------------------------------------
    def _fill(self):
        return self.mask_token if self.mask_token is not None else self.cfg.masking.fill

    def reconstruct(self, x: torch.Tensor, generator: torch.Generator) -> dict:
        """Mask x (B, C, D, H, W), reconstruct it, and return the loss with what produced it."""
        if self.teacher is not None:
            self.masker.step = self.global_step
        mask = self.masker(x, generator=generator)
        x_in = apply_mask(x, mask, self._fill(), generator=generator)
        out = self.net(x_in)
        pred = out[:, : self.channels]
        loss = masked_l1(pred, x, mask)
        result = {"loss": loss, "recon_loss": loss, "mask": mask, "x_in": x_in, "pred": pred}
        if self.predicts_loss:
            predicted = self.per_subvolume(out[:, self.channels :]).flatten(1)
            true = self.per_subvolume((pred - x).abs()).detach().flatten(1)
            flat_mask = mask.flatten(1)
            p_loss = ranking_loss(predicted, true, flat_mask, self.cfg.masking.max_pairs, generator)
            result.update(loss=loss + self.cfg.masking.predictor_weight * p_loss, predictor_loss=p_loss,
                          predicted=predicted, true=true)
        return result

    def training_step(self, batch: dict, batch_idx: int):
        x = torch.as_tensor(batch["image"]).float()
        out = self.reconstruct(x, self.mask_rng())
        loss = out["loss"]
        if not torch.isfinite(loss):
            self.skipped_steps += 1
            self.bad_in_a_row += 1
            log.warning("non-finite loss at step %d: step skipped (%d in a row)", self.global_step, self.bad_in_a_row)
            if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
                raise SubforeError(
                    f"{self.bad_in_a_row} non-finite losses in a row (train.max_bad_steps): lower optim.lr, "
                    f"set train.grad_clip, or check the data for NaN"
                )
            if self.trainer.world_size > 1:
                # Every rank must run backward under DDP: a zero loss over the parameters skips in effect.
                return sum(p.sum() for p in self.parameters()) * 0.0
            return None
        self.bad_in_a_row = 0
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        self.log("lr", lr, prog_bar=True, batch_size=x.shape[0])
        stats = self.masker.last_stats
        if "fallbacks" in stats:
            # Accumulated on the device; read (synchronised) only when logging.
            self.fallbacks_total = stats["fallbacks"] + self.fallbacks_total
        if self._logging_now():
            fg = stats.get("foreground_fraction")
            if fg is None:
                fg = foreground_grid(x, self.masker.size, self.threshold).float().mean()
            self.last = {
                "loss": float(out["recon_loss"].detach()),
                "lr": lr,
                "masked_fraction": float(out["mask"].float().mean()),
                "foreground_fraction": float(fg),
                "fallbacks": int(self.fallbacks_total),
                "skipped_steps": self.skipped_steps,
                "empty_masks": EMPTY_MASKS.value,
            }
            if self.teacher is not None:
                self.last["r_t"] = float(stats["r_t"])
                self.last["teacher_fg_share"] = float(stats["teacher_fg_share"])
            if self.predicts_loss:
                sel = out["mask"].flatten(1)
                self.last["predictor_loss"] = float(out["predictor_loss"].detach())
                self.last["spearman"] = float(spearman(out["predicted"][sel].detach(), out["true"][sel]))
        if self._snapshot_now():
            self.last_views = {k: v[:1].detach().float().cpu() for k, v in (("x", x), ("x_in", out["x_in"]), ("pred", out["pred"]))}
            self.last_views["mask"] = out["mask"][:1].cpu()
        return loss

    def _logging_now(self) -> bool:
        step = self.global_step + 1
        return step == 1 or step % self.cfg.train.log_every == 0 or step == self.cfg.train.max_steps

    def _snapshot_now(self) -> bool:
        every = self.cfg.train.snapshot_every
        step = self.global_step + 1
        return bool(every) and (step % every == 0 or step == 1)

    def on_validation_epoch_start(self) -> None:
        # A fixed mask seed makes validation losses comparable across steps.
        self._val_rng = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 99_991)

    def validation_step(self, batch: dict, batch_idx: int):
        x = torch.as_tensor(batch["image"]).float()
        loss = self.reconstruct(x, self._val_rng)["loss"]
        self.log("val/loss", loss, prog_bar=True, batch_size=x.shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self):
        o, t = self.cfg.optim, self.cfg.train
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:  # the EMA teacher
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=o.betas,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, o.warmup_steps, t.max_steps, o.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def export_encoder(self, run_dir: Path) -> Path:
        """Write RUN_DIR/encoder.pt (a plain state_dict without the output layer) and encoder.json."""
        path = run_dir / "encoder.pt"
        save_atomic(encoder_state(self.net, self.cfg.model.name), path)
        meta = {"model": self.cfg.model.model_dump(mode="json"), "in_channels": self.channels,
                "roi": list(self.cfg.data.roi), "step": int(self.global_step),
                "preset": self.cfg.data.preset_obj().model_dump(mode="json")}
        tmp = run_dir / ".encoder.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(run_dir / "encoder.json")
        return path


class RunArtifacts(Callback):
    """metrics.jsonl at every logged step, snapshots, and encoder.pt beside each checkpoint."""

    def __init__(self, run_dir: Path, ckpt_every: int) -> None:
        self.run_dir = run_dir
        self.ckpt_every = ckpt_every

    def on_train_batch_end(self, trainer, pl_module: MaskedImageModel, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        if pl_module.last:
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps({"step": step, **pl_module.last}) + "\n")
            pl_module.last = {}
        views = getattr(pl_module, "last_views", None)
        if views is not None:
            from .visualize import save_snapshot

            save_snapshot(views, pl_module.masker.size, self.run_dir / "snapshots" / f"step_{step:06d}.png", step)
            pl_module.last_views = None
        if step % self.ckpt_every == 0:
            pl_module.export_encoder(self.run_dir)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps({"step": trainer.global_step,
                                     "val_loss": float(trainer.callback_metrics["val/loss"])}) + "\n")


def ensure_phantoms(cfg) -> None:
    """Generate the built-in phantoms when the config asks for them and they are absent."""
    ph = cfg.data.phantoms
    if ph is None or (Path(ph.dir) / "dataset.json").exists():
        return
    from .phantoms import PhantomSpec, write_phantoms

    log.warning("generating %d phantoms in %s", ph.n, ph.dir)
    write_phantoms(ph.dir, n=ph.n, seed=ph.seed, spec=PhantomSpec(spacing=ph.spacing))


def make_loaders(cfg: PretrainConfig) -> tuple[DataLoader, DataLoader | None]:
    """Training loader of random ROI crops (cached preprocessing) and an optional centre-crop val loader."""
    d, t = cfg.data, cfg.train
    preset = d.preset_obj()
    train_items = load_datalists(d.train, d.train_split)
    train_ds = make_dataset(train_items, pretrain_transforms(preset, d.roi, d.samples_per_volume), d.cache_dir,
                            cache_key=(preset,), skip_bad=d.skip_bad)
    train = DataLoader(
        train_ds, batch_size=t.batch_size // d.samples_per_volume, shuffle=True, drop_last=len(train_ds) > 1,
        num_workers=d.num_workers, persistent_workers=d.num_workers > 0, pin_memory=torch.cuda.is_available(),
    )
    val = None
    if d.val:
        val_items = load_datalists(d.val, d.val_split)
        val_ds = make_dataset(val_items, center_transforms(preset, d.roi), d.cache_dir,
                              cache_key=(preset, "center", list(d.roi)), skip_bad=d.skip_bad)
        val = DataLoader(val_ds, batch_size=1, num_workers=min(1, d.num_workers))
    return train, val


def make_trainer(run_dir: Path, t, callbacks: list, validate: bool) -> pl.Trainer:
    """The Lightning Trainer both engines use: step-based, validation every ``t.val_every`` steps, TensorBoard."""
    return pl.Trainer(
        default_root_dir=run_dir,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        precision=resolve_precision(t.precision),
        max_steps=t.max_steps,
        max_epochs=None,
        accumulate_grad_batches=t.accumulate,
        gradient_clip_val=t.grad_clip,
        logger=TensorBoardLogger(run_dir, name="tensorboard", version=""),
        callbacks=callbacks,
        log_every_n_steps=t.log_every,
        # Validation counts optimiser steps across epochs, not batches within one.
        check_val_every_n_epoch=None if validate else 1,
        val_check_interval=min(t.val_every, t.max_steps) if validate else None,
        num_sanity_val_steps=0,
        limit_val_batches=None if validate else 0,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
    )


def last_checkpoint(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def pretrain(cfg: PretrainConfig, resume: str | Path | None = None) -> Path:
    """Run (or resume) a pretraining; return the path of the exported encoder.pt.

    resume: a checkpoint path, or ``"last"`` for RUN_DIR/checkpoints/last.ckpt.
    """
    run_dir = Path(cfg.run_dir)
    ckpt_path = None
    if resume is not None:
        ckpt_path = last_checkpoint(run_dir) if str(resume) == "last" else Path(resume)
        if not ckpt_path.exists():
            raise SubforeError(f"{ckpt_path}: no checkpoint to resume from")
    check_roi(cfg.model.name, cfg.data.roi, cfg.masking.subvolume_size)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    ensure_phantoms(cfg)
    train_loader, val_loader = make_loaders(cfg)
    model = MaskedImageModel(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    t = cfg.train
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_top_k=0, save_last=True,
                                 every_n_train_steps=t.ckpt_every, save_on_train_epoch_end=False)
    trainer = make_trainer(run_dir, t, [checkpoint, RunArtifacts(run_dir, t.ckpt_every)], val_loader is not None)
    trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt_path)
    if trainer.is_global_zero:
        trainer.save_checkpoint(last_checkpoint(run_dir))
        return model.export_encoder(run_dir)
    return run_dir / "encoder.pt"
