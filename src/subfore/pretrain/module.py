"""The masked-image-modelling LightningModule: one module for every backbone and masking strategy."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import __version__
from ..config import PretrainConfig
from ..engine.module import RunModule, adamw, reduce_sum, tensor_digest, warmup_cosine
from ..engine.sampling import mix_seed
from ..masking import (EmptyMaskCounter, Window, apply_mask, foreground_grid, from_config, masked_loss,
                       patch_normalise, random_grid, voxel_error)
from ..masking.random import RandomMask
from ..masking.teacher import TeacherGuidedMask, ema_momentum, ranking_loss, spearman
from ..models.artifact import EncoderMeta, write_encoder
from ..models.mae import patch_grid
from ..models.registry import Backbone, resolve_backbone
from ..models.artifact import WeightsFile
from ..models.weights import LoadReport, load_pretrained


def reference_of(batch: dict) -> torch.Tensor | None:
    """The batch's foreground reference (B, C, D, H, W), where the preset carries one beside the image."""
    ref = batch.get("reference")
    return None if ref is None else torch.as_tensor(ref).float()


class MaskedImageModel(RunModule):
    """Reconstruct masked subvolumes: x → mask → the network → masked L1 (or MSE) against x.

    ``model.encoding: dense`` (SimMIM): masked voxels are filled and the whole crop goes through the backbone.
    ``visible`` (MAE): the ViT encodes the visible patches only and a light decoder predicts every patch.
    """

    val_metrics = {"val/loss": ("val_loss", float)}

    def __init__(self, cfg: PretrainConfig, backbone: Backbone | None = None,
                 foreground: tuple[float | str, Window | None] | None = None) -> None:
        """backbone, foreground: the config's backbone and (λ, window) when the caller resolved them already."""
        super().__init__(cfg.seed, cfg.train.max_bad_steps, cfg.train.log_every)
        self.cfg = cfg
        self.save_hyperparameters({"config": cfg.model_dump(mode="json")})
        mk = cfg.masking
        if backbone is None:
            backbone = resolve_backbone(cfg.model)
            backbone.check_roi(cfg.data.roi, mk.subvolume_size)
        self.backbone = backbone
        self.channels = cfg.data.channels
        self.predicts_loss = mk.strategy == "hpm"
        self.visible = cfg.model.encoding == "visible"
        if self.visible:
            # HPM's loss predictor is a head on the decoder's tokens; masking.fill does not apply (the decoder has
            # its own mask token), and MAE's per-patch target normalisation is per ViT patch.
            self.net = backbone.build_visible(self.channels, cfg.data.roi, cfg.decoder, self.predicts_loss)
            self.patches_per_subvolume = mk.subvolume_size // backbone.spec.patch_size
            self.norm_size = backbone.spec.patch_size
        else:
            # HPM's loss predictor is one extra output channel, pooled per subvolume.
            self.net = backbone.build(self.channels, self.channels + int(self.predicts_loss), cfg.data.roi)
            self.norm_size = mk.subvolume_size
        use_token = mk.fill == "token" and not self.visible
        self.mask_token = torch.nn.Parameter(torch.zeros(self.channels)) if use_token else None
        # λ in the preset's units; window: what λ is range-checked against (none for nnU-Net's z-scores).
        self.threshold, window = foreground if foreground is not None else cfg.foreground_threshold()
        self.masker = from_config(mk, self.threshold, window)
        self.teacher = None
        if isinstance(self.masker, TeacherGuidedMask):
            # The EMA teacher: a frozen copy of the student, saved in checkpoints with the module's state.
            self.teacher = copy.deepcopy(self.net).requires_grad_(False).eval()
            self.masker.scorer = self.teacher_scores
            self.masker.total_steps = cfg.train.max_steps
        self.fallbacks_total = 0
        self.empty_masks = EmptyMaskCounter()  # this rank's training losses that had nothing masked
        self.last_views: dict | None = None
        self._seen: dict = {}
        self._row_seen: dict = {}
        self.data_summary: dict | None = None  # for encoder.json: how many volumes, from which datalist
        self.probe_score: dict | None = None  # for encoder.json: the last linear probe's mean Dice

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
        self.empty_masks.reset(state.get("empty_masks", 0))

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

        AnatoMask: the teacher's error (masking.loss, against the student's target) under a random ρ mask of the
        candidates. HPM: the teacher's predicted loss on the unmasked input. The teacher is an EMA of the whole
        network: with visible encoding, encoder and decoder.
        """
        if self.predicts_loss:
            return self.run_net(self.teacher, x, None, generator)[1]
        m = random_grid(tuple(candidates.shape), self.masker.ratio, x.device, generator, True, candidates)
        pred = self.run_net(self.teacher, x, m, generator)[0]
        return self.per_subvolume(voxel_error(pred, self.target(x)[0], self.cfg.masking.loss)).masked_fill(
            ~m, float("-inf"))

    def after_step(self) -> None:
        """The EMA teacher follows the student after every optimiser step that was taken: its lerp weight is
        1 − m times ``step_applied``, 0 on a step skipped on the device (non-finite loss, or GradScaler's skip)."""
        if self.teacher is not None:
            mk = self.cfg.masking
            m = ema_momentum(self.global_step, self.cfg.train.max_steps, mk.ema_momentum, mk.ema_momentum_end,
                             mk.ema_ramp, mk.ema_ramp_fraction)
            applied = self.step_applied
            weight = (1.0 - m) * applied if isinstance(applied, float) else (applied * (1.0 - m)).to(torch.float32)
            with torch.no_grad():
                t, s = list(self.teacher.parameters()), list(self.net.parameters())
                torch._foreach_lerp_(t, s, weight)

    # --- the step -----------------------------------------------------------------------------
    def _fill(self):
        return self.mask_token if self.mask_token is not None else self.cfg.masking.fill

    def run_net(self, net: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None, generator
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``net`` (the student or its EMA teacher) on x (B, C, D, H, W) under a subvolume mask (None: nothing
        masked) → (reconstruction (B, C, D, H, W), predicted loss per subvolume (B, nz, ny, nx) or None (not hpm),
        the masked input the network saw (dense) or None (visible, or nothing masked))."""
        if self.visible:
            k = self.patches_per_subvolume
            patches = (torch.zeros((x.shape[0], *(s // self.norm_size for s in x.shape[2:])), dtype=torch.bool,
                                   device=x.device) if mask is None else patch_grid(mask, k))
            pred, loss = net(x, patches, self.visible_bound(patches, mask))
            if loss is not None and k > 1:
                loss = F.avg_pool3d(loss[:, None], k, k)[:, 0]
            return pred, loss, None
        x_in = x if mask is None else apply_mask(x, mask, self._fill(), generator=generator)
        out = net(x_in)
        loss = self.per_subvolume(out[:, self.channels :]) if self.predicts_loss else None
        return out[:, : self.channels], loss, (None if mask is None else x_in)

    def visible_bound(self, patches: torch.Tensor, mask: torch.Tensor | None) -> int | None:
        """MAE: the most visible patches a sample of this mask can have, where the host knows it without reading the
        device (nothing masked: all; an exact-count random mask: N − round(ρ·N) subvolumes' patches); else None."""
        n = patches[0].numel()
        if mask is None:
            return n
        if isinstance(self.masker, RandomMask) and self.masker.exact:
            cells = mask[0].numel()
            return (cells - round(cells * self.masker.ratio)) * (n // cells)
        return None

    def target(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """What the network reconstructs: x itself, or (masking.norm_pix_loss) x normalised per patch, with the
        (mean, std) that map a prediction back to intensities."""
        if not self.cfg.masking.norm_pix_loss:
            return x, None
        normed, mean, std = patch_normalise(x, self.norm_size)
        return normed, (mean, std)

    def reconstruct(self, x: torch.Tensor, generator: torch.Generator, reference: torch.Tensor | None = None) -> dict:
        """Mask x (B, C, D, H, W), reconstruct it, and return the loss with what produced it.

        reference: (B, C, D, H, W) what the foreground is decided on, when the preset carries one beside x.
        """
        if self.teacher is not None:
            self.masker.step = self.global_step
        mk = self.cfg.masking
        mask = self.masker(x, generator=generator, reference=reference)
        pred, predicted, x_in = self.run_net(self.net, x, mask, generator)
        target, stats = self.target(x)
        loss = masked_loss(pred, target, mask, mk.loss, counter=self.empty_masks if self.training else None)
        shown = pred.detach() if stats is None else pred.detach() * stats[1] + stats[0]
        result = {"loss": loss, "recon_loss": loss, "mask": mask, "x_in": x_in, "pred": shown}
        if self.predicts_loss:
            predicted = predicted.flatten(1)
            true = self.per_subvolume(voxel_error(pred, target, mk.loss)).detach().flatten(1)
            flat_mask = mask.flatten(1)
            p_loss = ranking_loss(predicted, true, flat_mask, self.cfg.masking.max_pairs, generator)
            result.update(loss=loss + self.cfg.masking.predictor_weight * p_loss, predictor_loss=p_loss,
                          predicted=predicted, true=true)
        return result

    def training_step(self, batch: dict, batch_idx: int):
        x = torch.as_tensor(batch["image"]).float()
        ref = reference_of(batch)
        out = self.reconstruct(x, self.step_generator(), ref)
        loss = out["loss"]
        # A non-finite loss still goes through backward on every rank; optimizer_step then skips together.
        self.note_loss(loss, shown=out["recon_loss"])
        stats = self.masker.last_stats
        if "fallbacks" in stats:
            # Accumulated on the device; read (synchronised) only when logging.
            self.fallbacks_total = stats["fallbacks"] + self.fallbacks_total
        # Nothing logged through self.log here: Lightning would read its progress-bar values from the device at
        # every step. The logged step's values are read in one transfer (RunModule.log_values).
        if self.logging_now() or self._snapshot_now():
            self._seen = {"x": x.detach(), "ref": ref, "out": out, "stats": dict(stats)}
        return loss

    def step_ended(self) -> None:
        # Runs on every rank after the last micro-batch of a step; log_values (logged steps) comes next.
        seen = self._seen
        self._seen = {}
        self._row_seen = seen if seen and self.logging_now() else {}
        if seen and self._snapshot_now():  # a copy to the host, at snapshot steps only
            x_in = seen["out"]["x_in"]
            if x_in is None:  # visible encoding: the network saw no filled voxels; show the masked ones as 0
                x_in = apply_mask(seen["x"], seen["out"]["mask"], "zero")
            views = (("x", seen["x"]), ("x_in", x_in), ("pred", seen["out"]["pred"]))
            self.last_views = {k: v[:1].detach().float().cpu() for k, v in views}
            self.last_views["mask"] = seen["out"]["mask"][:1].cpu()

    def log_values(self) -> dict:
        """The logged step's row values (its last micro-batch's mask and crops) as device scalars."""
        seen, self._row_seen = self._row_seen, {}
        values = {"loss": self.step_loss()}
        if not seen:
            return values
        x, out, stats = seen["x"], seen["out"], seen["stats"]
        fg = stats.get("foreground_fraction")
        if fg is None:
            source = x if seen.get("ref") is None else seen["ref"]
            fg = foreground_grid(source, self.masker.size, self.threshold).float().mean()
        values.update(masked_fraction=out["mask"].float().mean(), foreground_fraction=fg,
                      fallbacks=self.fallbacks_total, empty_masks=self.empty_masks.total())
        if self.teacher is not None:
            values.update(r_t=float(self.masker.r_t), teacher_fg_share=stats["teacher_fg_share"])
        if self.predicts_loss:
            sel = out["mask"].flatten(1)
            values.update(predictor_loss=out["predictor_loss"].detach(),
                          spearman=spearman(out["predicted"][sel].detach(), out["true"][sel]))
        if self.trainer.world_size > 1:
            # Per-rank fingerprints of this step's crops and masks (they must differ).
            values.update(crop=tensor_digest(x), masks=tensor_digest(out["mask"]))
        return values

    def make_row(self, values: dict[str, list[float]]) -> dict:
        """The metrics.jsonl row of the step that just ended, from :meth:`log_values` as read on every rank."""
        me = self.global_rank
        losses = values["loss"]
        row = {"loss": losses[me], "lr": self.trainer.optimizers[0].param_groups[0]["lr"]}
        if "masked_fraction" not in values:
            return row
        row.update(masked_fraction=values["masked_fraction"][me],
                   foreground_fraction=values["foreground_fraction"][me],
                   fallbacks=int(values["fallbacks"][me]), skipped_steps=self.skipped_steps,
                   empty_masks=int(values["empty_masks"][me]))
        for key in ("r_t", "teacher_fg_share", "predictor_loss", "spearman"):
            if key in values:
                row[key] = float(values[key][me])
        if self.trainer.world_size > 1:
            # The loss over all ranks, and per-rank fingerprints of this step's crops and masks.
            row.update(loss=sum(losses) / len(losses), rank_loss=losses, rank_crop_digest=values["crop"],
                       rank_mask_digest=values["masks"])
        row["time"] = round(time.time(), 3)
        return row

    def logging_now(self) -> bool:
        step = self.global_step + 1
        return step == 1 or step % self.cfg.train.log_every == 0 or step == self.cfg.train.max_steps

    def _snapshot_now(self) -> bool:
        every = self.cfg.train.snapshot_every
        step = self.global_step + 1
        return bool(every) and (step % every == 0 or step == 1)

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int):
        x = torch.as_tensor(batch["image"]).float()
        w = torch.as_tensor(batch["weight"]).to(self.device, torch.float64)
        # One mask per validation case, seeded by the case: val_loss compares across steps and process counts.
        case = int(torch.as_tensor(batch["case"]).flatten()[0])
        generator = torch.Generator(device=self.device).manual_seed(mix_seed(self.cfg.seed, case, 99_991))
        loss = self.reconstruct(x, generator, reference_of(batch))["loss"]
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
        opt = adamw(self, [{"params": decay, "weight_decay": o.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=o.betas)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, o.warmup_steps, t.max_steps, o.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def init_weights(self, path: str | Path | WeightsFile) -> LoadReport:
        """Start from the weights in ``path`` (every encoder tensor, and the output layer where it fits); the EMA
        teacher starts from the same weights."""
        report = load_pretrained(self.net, path, self.cfg.model.name, head=True,
                                 architecture=self.backbone.architecture)
        if self.teacher is not None:
            self.teacher.load_state_dict(self.net.state_dict())
        return report

    def export_encoder(self, run_dir: Path) -> Path:
        """Write RUN_DIR/encoder.json and the encoder (no output layer) as export.formats: encoder.pt, .safetensors."""
        meta = EncoderMeta(model=self.cfg.model.model_dump(mode="json"), in_channels=self.channels,
                           roi=tuple(self.cfg.data.roi), step=int(self.global_step), preset=self.cfg.data.preset_obj(),
                           masking=self.cfg.masking.model_dump(mode="json"), data=self.data_summary,
                           probe=self.probe_score, subfore_version=__version__, **self.backbone.meta())
        return write_encoder(run_dir, self.backbone.encoder_state(self.net), meta, tuple(self.cfg.export.formats))
