"""The segmentation LightningModule: DiceCE training with sliding-window validation (mean foreground Dice)."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss

from ..config import FinetuneConfig
from ..engine.module import RunModule, adamw, reduce_sum, warmup_cosine
from ..engine.run import autocast_of
from ..inference import predict_volume
from ..models.registry import Backbone, resolve_backbone
from ..report import dice_per_class


class SegmentationModel(RunModule):
    """DiceCE segmentation training with sliding-window validation (mean foreground Dice)."""

    val_metrics = {"val/dice": ("val_dice", float), "val/cases": ("val_cases", int)}

    def __init__(self, cfg: FinetuneConfig, backbone: Backbone | None = None) -> None:
        super().__init__(cfg.seed, cfg.train.max_bad_steps, cfg.train.log_every)
        self.cfg = cfg
        self.save_hyperparameters({"config": cfg.model_dump(mode="json"), "kind": "subfore-finetune"})
        if backbone is None:
            backbone = resolve_backbone(cfg.model)
            backbone.check_roi(cfg.data.roi)
        self.backbone = backbone
        self.net = self.backbone.build(cfg.data.channels, cfg.model.out_channels, cfg.data.roi)
        self.loss = DiceCELoss(to_onehot_y=not cfg.sigmoid, softmax=not cfg.sigmoid, sigmoid=cfg.sigmoid)

    def training_step(self, batch, batch_idx):
        # Plain tensors: MONAI's MetaTensor handles batch metadata on the host at every indexing op in the loss.
        x, y = (torch.as_tensor(batch[k]).as_subclass(torch.Tensor).float() for k in ("image", "label"))
        loss = self.loss(self.net(x), y)
        # Not through self.log: Lightning would read its progress-bar values from the device at every step. The
        # logged steps' row ({"loss": the mean over ranks}) is RunModule's, read in one transfer.
        self.note_loss(loss)
        return loss

    def on_validation_epoch_start(self) -> None:
        k = self.cfg.model.out_channels - (0 if self.cfg.sigmoid else 1)
        # Per class: sum of Dice over the cases where the class is present, and their count; then cases scored.
        self._dice_sum = torch.zeros(2 * k + 1, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx):
        x, y = torch.as_tensor(batch["image"]).float(), torch.as_tensor(batch["label"])
        w = torch.as_tensor(batch["weight"]).to(self.device, torch.float64)  # 0 for a rank's padding copy
        # The training step's precision (Lightning's autocast); the loss and Dice stay fp32.
        pred = predict_volume(self.net, x, self.cfg.data.roi, self.cfg.finetune.sw_overlap,
                              self.cfg.finetune.sw_batch_size, self.cfg.sigmoid,
                              autocast_of(self.trainer.precision))
        dice = dice_per_class(pred, y, self.cfg.model.out_channels, self.cfg.sigmoid).double().to(self.device)  # (B, classes), NaN where the class is absent from the label
        present = torch.isfinite(dice).double() * w[:, None]
        self._dice_sum += torch.cat([(dice.nan_to_num(0.0) * present).sum(0), present.sum(0), w.sum()[None]])

    def on_validation_epoch_end(self) -> None:
        # Each case counted once across ranks: per-class mean over the cases that contain the class, then the
        # mean over classes (MONAI's DiceMetric 'mean_batch' with ignore_empty, then nanmean).
        total = reduce_sum(self, self._dice_sum)
        k = (total.numel() - 1) // 2
        per_class = total[:k] / total[k : 2 * k]
        mean = torch.nanmean(per_class) if torch.isfinite(per_class).any() else torch.tensor(0.0)
        self.log("val/dice", mean.float(), prog_bar=True)
        self.log("val/cases", total[-1].float())

    def configure_optimizers(self):
        o, t = self.cfg.optim, self.cfg.train
        opt = adamw(self, self.net.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, o.warmup_steps, t.max_steps, o.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
