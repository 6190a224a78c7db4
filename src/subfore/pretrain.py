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
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from .config import PretrainConfig, dump_config
from .data.datalist import load_datalists
from .data.dataset import make_dataset
from .data.store import StoreCrops, preprocess_store, records_for, store_for, wait_for_store
from .data.transforms import center_transforms, pretrain_transforms
from .engine import (
    RunControl,
    RunModule,
    append_jsonl,
    check_fill,
    first_rank_prepares,
    make_trainer,
    mix_seed,
    gather_scalars,
    reduce_sum,
    resolve_precision,
    resolve_resume,
    shard,
    tensor_digest,
    train_loader,
)
from .errors import DataError, SubforeError
from .masking import (
    REGISTRY,
    EmptyMaskCounter,
    ForegroundMask,
    RandomMask,
    apply_mask,
    foreground_grid,
    make_generator,
    masked_l1,
    random_grid,
)
from .masking.teacher import TeacherGuidedMask, ema_momentum, ranking_loss, spearman
from .models import backbone_meta, build_backbone, check_roi, encoder_state, save_atomic

__all__ = ["MaskedImageModel", "pretrain", "resolve_precision", "warmup_cosine"]

log = logging.getLogger(__name__)


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """LR multiplier: linear from 0 to 1 over ``warmup`` steps, then cosine down to ``floor`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class MaskedImageModel(RunModule):
    """Reconstruct masked subvolumes: x → mask → apply_mask → backbone → masked L1 against x."""

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__(cfg.seed, cfg.train.max_bad_steps)
        self.cfg = cfg
        self.save_hyperparameters({"config": cfg.model_dump(mode="json")})
        m, mk = cfg.model, cfg.masking
        check_roi(m.name, cfg.data.roi, mk.subvolume_size, m.nnunet_plans, m.nnunet_configuration)
        self.channels = cfg.data.channels
        self.predicts_loss = mk.strategy == "hpm"
        # HPM's loss predictor is one extra output channel, pooled per subvolume.
        self.net = build_backbone(
            m.name, self.channels, self.channels + int(self.predicts_loss), cfg.data.roi, m.feature_size, m.use_v2,
            m.checkpointing, m.hidden_size, m.mlp_dim, m.num_heads, m.dropout, m.nnunet_plans, m.nnunet_configuration,
        )
        self.mask_token = torch.nn.Parameter(torch.zeros(self.channels)) if mk.fill == "token" else None
        thr = mk.threshold_kwargs()
        # λ in the preset's units; window: what λ is range-checked against (none for nnU-Net's z-scores).
        self.threshold, window = cfg.data.preset_obj().foreground_threshold(thr.get("threshold"),
                                                                            thr.get("threshold_hu"))
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
        self.fallbacks_total = 0
        self.empty_masks = EmptyMaskCounter()  # this rank's training losses that had nothing masked
        self.last: dict = {}
        self.last_views: dict | None = None
        self._seen: dict = {}

    # --- reproducible masks -------------------------------------------------------------------
    def step_generator(self) -> torch.Generator:
        """The mask generator of this micro-batch, seeded from (seed, rank, step, micro-batch).

        Nothing to save or restore: a resumed run (same number of ranks) draws the masks it would have drawn.
        """
        seed = mix_seed(self.cfg.seed, self.global_rank, self.global_step, self.micro_batch, 0x3A5C)
        return torch.Generator(device=self.device).manual_seed(seed)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["subfore"]["fallbacks_total"] = int(self.fallbacks_total)
        checkpoint["subfore"]["empty_masks"] = self.empty_masks.value

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("subfore", {})
        self.fallbacks_total = state.get("fallbacks_total", 0)
        self.empty_masks.reset()
        self.empty_masks.add(torch.tensor(state.get("empty_masks", 0)))

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

    def after_step(self) -> None:
        """The EMA teacher follows the student after every optimiser step that was taken."""
        if self.teacher is not None:
            mk = self.cfg.masking
            m = ema_momentum(self.global_step, self.cfg.train.max_steps, mk.ema_momentum, mk.ema_momentum_end,
                             mk.ema_ramp, mk.ema_ramp_fraction)
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
        loss = masked_l1(pred, x, mask, counter=self.empty_masks if self.training else None)
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
        out = self.reconstruct(x, self.step_generator())
        loss = out["loss"]
        # A non-finite loss still goes through backward on every rank; optimizer_step then skips together.
        self.note_loss(loss, shown=out["recon_loss"])
        stats = self.masker.last_stats
        if "fallbacks" in stats:
            # Accumulated on the device; read (synchronised) only when logging.
            self.fallbacks_total = stats["fallbacks"] + self.fallbacks_total
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, batch_size=x.shape[0])
        if self._logging_now() or self._snapshot_now():
            self._seen = {"x": x.detach(), "out": out, "stats": dict(stats)}
        return loss

    def step_ended(self) -> None:
        # Runs on every rank after the last micro-batch of a step, so the gathers in step_row line up.
        seen, self._seen = self._seen, {}
        if seen and self._logging_now():
            self.last = self.step_row(seen)
        if seen and self._snapshot_now():
            views = (("x", seen["x"]), ("x_in", seen["out"]["x_in"]), ("pred", seen["out"]["pred"]))
            self.last_views = {k: v[:1].detach().float().cpu() for k, v in views}
            self.last_views["mask"] = seen["out"]["mask"][:1].cpu()

    def step_row(self, seen: dict) -> dict:
        """The metrics.jsonl row of the step that just ended (its last micro-batch's mask and crops)."""
        x, out, stats = seen["x"], seen["out"], seen["stats"]
        fg = stats.get("foreground_fraction")
        if fg is None:
            fg = foreground_grid(x, self.masker.size, self.threshold).float().mean()
        row = {
            "loss": self.step_loss(),
            "lr": self.trainer.optimizers[0].param_groups[0]["lr"],
            "masked_fraction": float(out["mask"].float().mean()),
            "foreground_fraction": float(fg),
            "fallbacks": int(self.fallbacks_total),
            "skipped_steps": self.skipped_steps,
            "empty_masks": self.empty_masks.value,
        }
        if self.teacher is not None:
            row["r_t"] = float(stats["r_t"])
            row["teacher_fg_share"] = float(stats["teacher_fg_share"])
        if self.predicts_loss:
            sel = out["mask"].flatten(1)
            row["predictor_loss"] = float(out["predictor_loss"].detach())
            row["spearman"] = float(spearman(out["predicted"][sel].detach(), out["true"][sel]))
        if self.trainer.world_size > 1:
            # The loss over all ranks, and per-rank fingerprints of this step's crops and masks (they must differ).
            losses, crops, masks = gather_scalars(self, [torch.tensor(row["loss"]), tensor_digest(x),
                                                         tensor_digest(out["mask"])])
            row.update(loss=sum(losses) / len(losses), rank_loss=losses, rank_crop_digest=crops,
                       rank_mask_digest=masks)
        return row

    def _logging_now(self) -> bool:
        step = self.global_step + 1
        return step == 1 or step % self.cfg.train.log_every == 0 or step == self.cfg.train.max_steps

    def _snapshot_now(self) -> bool:
        every = self.cfg.train.snapshot_every
        step = self.global_step + 1
        return bool(every) and (step % every == 0 or step == 1)

    def on_validation_epoch_start(self) -> None:
        # A fixed mask seed makes validation losses comparable across steps.
        self._val_rng = torch.Generator(device=self.device).manual_seed(mix_seed(self.cfg.seed, self.global_rank, 99_991))
        self._val_sum = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int):
        x = torch.as_tensor(batch["image"]).float()
        w = torch.as_tensor(batch["weight"]).to(self.device, torch.float64)
        loss = self.reconstruct(x, self._val_rng)["loss"]
        self._val_sum += torch.stack([(loss.double() * w).sum(), w.sum()])
        return loss

    def on_validation_epoch_end(self) -> None:
        # Mean over the validation volumes, each counted once across ranks.
        total, count = reduce_sum(self, self._val_sum).tolist()
        self.log("val/loss", total / max(count, 1.0), prog_bar=True)

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
                "preset": self.cfg.data.preset_obj().model_dump(mode="json"), **backbone_meta(self.net)}
        tmp = run_dir / ".encoder.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(run_dir / "encoder.json")
        return path


class RunArtifacts(Callback):
    """Rank 0 writes metrics.jsonl at every logged step, snapshots, encoder.pt beside each checkpoint, and the
    linear probe's Dice (``probe_dice``) every ``probe.every`` steps and at the last step."""

    def __init__(self, run_dir: Path, ckpt_every: int, cfg: PretrainConfig | None = None) -> None:
        self.run_dir = run_dir
        self.ckpt_every = ckpt_every
        self.cfg = cfg
        self._probe = None

    def _probe_now(self, trainer, pl_module: MaskedImageModel) -> None:
        from .probe import Probe, plot_curve

        cfg, step = self.cfg, trainer.global_step
        if self._probe is None:
            self._probe = Probe(cfg.probe, cfg.model.model_dump(mode="json"), cfg.data.channels, cfg.data.roi,
                                cfg.data.preset_obj(), pl_module.device)
        net = self._probe.network()
        net.load_state_dict({k: v for k, v in pl_module.net.state_dict().items()
                             if k in net.state_dict() and v.shape == net.state_dict()[k].shape}, strict=False)
        row = {"step": step, "probe_dice": self._probe.run(net)["mean_dice"]}
        metrics = self.run_dir / "metrics.jsonl"
        if not any("probe_baseline" in json.loads(x) for x in metrics.read_text().splitlines() if x.strip()):
            row["probe_baseline"] = self._probe.baseline()["mean_dice"]  # the same head on a random init, once
        append_jsonl(metrics, row)
        plot_curve(metrics, self.run_dir / "probe_curve.png")

    def on_train_batch_end(self, trainer, pl_module: MaskedImageModel, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero or not pl_module.stepped:
            return
        step = trainer.global_step
        if pl_module.last:
            append_jsonl(self.run_dir / "metrics.jsonl", {"step": step, **pl_module.last, "time": round(time.time(), 3)})
            pl_module.last = {}
        if pl_module.last_views is not None:
            from .visualize import save_snapshot

            save_snapshot(pl_module.last_views, pl_module.masker.size,
                          self.run_dir / "snapshots" / f"step_{step:06d}.png", step)
            pl_module.last_views = None
        if step % self.ckpt_every == 0:
            pl_module.export_encoder(self.run_dir)
        p = self.cfg.probe if self.cfg is not None else None
        if p is not None and ((p.every and step % p.every == 0) or step == trainer.max_steps):
            self._probe_now(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            append_jsonl(self.run_dir / "metrics.jsonl",
                         {"step": trainer.global_step, "val_loss": float(trainer.callback_metrics["val/loss"])})


def ensure_phantoms(cfg) -> None:
    """Generate the built-in phantoms when the config asks for them and they are absent (rank 0; others wait)."""
    ph = cfg.data.phantoms
    if ph is None:
        return
    from .phantoms import PhantomSpec, write_phantoms

    def write() -> None:
        log.warning("generating %d phantoms in %s", ph.n, ph.dir)
        write_phantoms(ph.dir, n=ph.n, seed=ph.seed, spec=PhantomSpec(spacing=ph.spacing))

    first_rank_prepares(Path(ph.dir) / "dataset.json", write)


def make_loaders(cfg: PretrainConfig, trainer: pl.Trainer):
    """This rank's endless loader of random ROI crops and its share of the centre-crop validation volumes (or None).

    With ``data.cache_dir`` the crops come from the chunked store there: each rank first builds its shard of
    whatever the store lacks, then waits for the other ranks' shards (so the same config works with or
    without ``subfore preprocess``). Without a cache, every crop is preprocessed from the source file.
    """
    d, t = cfg.data, cfg.train
    rank, world = trainer.global_rank, trainer.world_size
    train_items = load_datalists(d.train, d.train_split)
    val_items = load_datalists(d.val, d.val_split) if d.val else []
    if d.val and not val_items:
        raise DataError(_name(d.val), f"the '{d.val_split}' split is empty")
    if d.cache_dir is None:
        preset = d.preset_obj()
        per_batch = check_fill(len(train_items), t.batch_size, d.samples_per_volume, world, _name(d.train))
        train_ds = make_dataset(train_items, pretrain_transforms(preset, d.roi, d.samples_per_volume),
                                skip_bad=d.skip_bad)
        val_ds = make_dataset(shard(val_items, rank, world), center_transforms(preset, d.roi),
                              skip_bad=d.skip_bad) if val_items else None
    else:
        spec = store_for(cfg)
        everything = train_items + val_items
        preprocess_store(spec, everything, workers=max(1, d.num_workers), shard=(rank, world), skip_bad=d.skip_bad,
                         progress=t.progress_bar and rank == 0, rank=rank)
        wait_for_store(spec, everything, d.skip_bad)
        records = records_for(spec, train_items, d.skip_bad)
        per_batch = check_fill(len(records), t.batch_size, d.samples_per_volume, world, _name(d.train))
        train_ds = StoreCrops(spec, records, d.roi, d.samples_per_volume, d.crop)
        val_ds = None
        # Every rank sees the same records and failures once the store is complete: the same lists everywhere.
        val_ok = [item for item in val_items if spec.record(item) is not None] if d.skip_bad else val_items
        if val_ok:
            mine = shard(val_ok, rank, world)
            val_ds = StoreCrops(spec, records_for(spec, mine, skip_bad=False), d.roi,
                                extras=[{"weight": item["weight"]} for item in mine])
    train = train_loader(train_ds, cfg.seed, per_batch, trainer, d.num_workers)
    val = None
    if val_ds is not None:
        from monai.data import DataLoader

        val = DataLoader(val_ds, batch_size=1, num_workers=min(1, d.num_workers))
    return train, val


class CropData(pl.LightningDataModule):
    """The loaders, built inside ``fit`` on every rank (after launch: each rank builds its own store shard)."""

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        self.cfg, self.loaders = cfg, None

    def setup(self, stage: str) -> None:
        if self.loaders is None:
            self.loaders = make_loaders(self.cfg, self.trainer)

    def train_dataloader(self):
        return self.loaders[0]

    def val_dataloader(self):
        return self.loaders[1] if self.loaders[1] is not None else []


def _name(source) -> str:
    return str(source if isinstance(source, str) else source[0])


def pretrain(cfg: PretrainConfig, resume: str | Path | None = None) -> Path:
    """Run (or resume) a pretraining; return the path of the exported encoder.pt.

    resume: a checkpoint path, ``"last"`` for RUN_DIR/checkpoints/last.ckpt, or ``"auto"`` (last.ckpt if present).
    Raises :class:`~subfore.engine.Preempted` after saving ``last.ckpt`` when SIGTERM/SIGUSR1 stopped the run.
    """
    run_dir = Path(cfg.run_dir)
    ckpt_path = resolve_resume(run_dir, resume)
    check_roi(cfg.model.name, cfg.data.roi, cfg.masking.subvolume_size, cfg.model.nnunet_plans,
              cfg.model.nnunet_configuration)
    pl.seed_everything(cfg.seed, verbose=False)
    ensure_phantoms(cfg)
    model = MaskedImageModel(cfg)
    t = cfg.train
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_top_k=0, save_last=True,
                                 every_n_train_steps=t.ckpt_every, save_on_train_epoch_end=False)
    control = RunControl(run_dir, on_end=lambda: model.export_encoder(run_dir))
    trainer = make_trainer(run_dir, t, [checkpoint, RunArtifacts(run_dir, t.ckpt_every, cfg), control],
                           cfg.data.val is not None)
    d = cfg.data
    # Fail before launching anything when the data cannot fill a batch on every rank.
    check_fill(len(load_datalists(d.train, d.train_split)), t.batch_size, d.samples_per_volume,
               trainer.world_size, _name(d.train))
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    control.fit(trainer, model, datamodule=CropData(cfg), ckpt_path=ckpt_path)
    return run_dir / "encoder.pt"
