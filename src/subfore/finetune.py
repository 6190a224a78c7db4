"""Segmentation finetuning (BTCV-style recipe) from pretrained weights, on Lightning.

    >>> from subfore.config import load_config
    >>> from subfore.finetune import FinetuneConfig, finetune
    >>> finetune(load_config("configs/finetune/btcv_swinunetr.yaml", [], FinetuneConfig), pretrained="runs/demo/encoder.pt")
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from monai.data import DataLoader, MetaTensor
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from monai.transforms import (
    Compose,
    CropForegroundd,
    MapTransform,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropSamplesd,
    SpatialPadd,
)
from pydantic import Field, model_validator

from .config import DataConfig, ModelConfig, OptimConfig, Strict, TrainConfig, dump_config, fill_lr_check_batch
from .data.brats import BratsRegionsd, resolve_convention
from .data.datalist import load_datalists
from .data.dataset import make_dataset
from .data.presets import Preset
from .data.transforms import preprocess, source_name
from .errors import DataError, SubforeError
from .engine import (
    RunControl,
    RunModule,
    append_jsonl,
    check_fill,
    make_trainer,
    reduce_sum,
    resolve_resume,
    shard,
    train_loader,
)
from .models import build_backbone, check_roi
from .pretrain import ensure_phantoms, warmup_cosine

log = logging.getLogger(__name__)


class FinetuneData(DataConfig):
    spacing: tuple[float, float, float] | None = (1.5, 1.5, 2.0)
    samples_per_volume: int = Field(4, ge=1)
    label_map: dict[int, int] | None = Field(None, description="{src_id: dst_id}; unlisted ids become 0")
    regions: Literal["brats"] | None = Field(None, description="brats: labels → TC/WT/ET channels, sigmoid outputs")
    brats_labels: Literal["msd", "brats"] | None = Field(
        None, description="label ids with regions: brats. msd: MSD Task01 (1 ED, 2 NET, 3 ET); brats: BraTS "
        "2018-2021 (1 NCR, 2 ED, 4 ET); unset: from the label names in dataset.json")
    limit_train: int | None = Field(None, ge=1, description="use only the first N training cases (label-efficient)")
    holdout: int | None = Field(None, ge=1, description="validate on the last N cases of data.train (not trained on) "
                                "instead of data.val")
    foreground_crop: bool = True
    crop: Literal["posneg", "classes"] = Field(
        "posneg", description="posneg: half the crops centred on foreground (BTCV recipe); "
        "classes: centres drawn evenly over the label classes, so small organs are seen as often as the liver")


class SegModelConfig(ModelConfig):
    out_channels: int = Field(14, ge=1, description="classes incl. background (or regions with data.regions)")
    class_names: list[str] | None = None


class FinetuneOptions(Strict):
    pretrained: str | None = None
    adapt_in_channels: Literal["repeat", "reinit"] = "repeat"
    min_encoder_loaded: float = Field(0.9, ge=0, le=1, description="refuse pretrained weights that fill less than "
                                      "this share of the encoder's tensors (0 accepts any partial load)")
    sw_overlap: float = Field(0.5, ge=0, lt=1)
    sw_batch_size: int = Field(4, ge=1)
    select: Literal["best", "last"] | None = Field(
        None, description="best: the checkpoint of highest validation Dice (needs data.val or data.holdout); "
        "last: the final weights; unset: best when there is a validation set, else last")


class FinetuneOptim(OptimConfig):
    lr: float | None = Field(None, gt=0, description="default: 1e-3 SwinUNETR, 3e-4 UNETR, 1e-3 BasicUNet")
    weight_decay: float = Field(1e-5, ge=0)


class FinetuneTrain(TrainConfig):
    batch_size: int = Field(8, ge=1, description="crops per step: 2 volumes × 4 crops (the seed's batch 2)")
    grad_clip: float | None = Field(None, gt=0)


FT_LR = {"swinunetr": 1e-3, "unetr": 3e-4, "basicunet": 1e-3, "resenc": 1e-3, "resenc_l": 1e-3}


class FinetuneConfig(Strict):
    """Everything ``subfore finetune`` needs; see configs/finetune/*.yaml."""

    run_dir: str = "runs/finetune"
    seed: int = 0
    data: FinetuneData
    model: SegModelConfig = Field(default_factory=SegModelConfig)
    finetune: FinetuneOptions = Field(default_factory=FinetuneOptions)
    optim: FinetuneOptim = Field(default_factory=FinetuneOptim)
    train: FinetuneTrain = Field(default_factory=FinetuneTrain)

    @model_validator(mode="after")
    def _defaults(self) -> "FinetuneConfig":
        fill_lr_check_batch(self, FT_LR)
        if self.data.holdout and self.data.val:
            raise ValueError("data.holdout and data.val both name a validation set; keep one")
        if self.finetune.select is None:
            self.finetune.select = "best" if (self.data.val or self.data.holdout) else "last"
        elif self.finetune.select == "best" and not (self.data.val or self.data.holdout):
            raise ValueError("finetune.select 'best' needs a validation set (data.val or data.holdout); "
                             "or set finetune.select: last")
        if self.model.class_names and len(self.model.class_names) != self.model.out_channels:
            raise ValueError(f"model.class_names has {len(self.model.class_names)} names for "
                             f"{self.model.out_channels} output channels")
        return self

    @property
    def sigmoid(self) -> bool:
        return self.data.regions is not None

    def class_names(self) -> list[str]:
        if self.model.class_names:
            return list(self.model.class_names)
        if self.data.regions == "brats":
            return ["TC", "WT", "ET"]
        from .phantoms import BTCV_NAMES

        if self.model.out_channels == 14:
            return [BTCV_NAMES[i] for i in range(14)]
        return ["background"] + [f"class_{i}" for i in range(1, self.model.out_channels)]


class RemapLabelsd(MapTransform):
    """Map label ids through ``{src: dst}``; ids not listed become background (0)."""

    def __init__(self, keys, mapping: Mapping[int, int]) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.mapping = {int(k): int(v) for k, v in mapping.items()}

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            t = torch.as_tensor(lab).long()
            lut = torch.zeros(max(int(t.max()), max(self.mapping)) + 1, dtype=torch.long)
            for src, dst in self.mapping.items():
                lut[src] = dst
            out = lut[t.clamp_min(0)].to(torch.float32)
            d[key] = MetaTensor(out, meta=lab.meta, applied_operations=lab.applied_operations) \
                if isinstance(lab, MetaTensor) else out
        return d


class CheckLabelsd(MapTransform):
    """Reject label ids that the network cannot output (≥ out_channels), naming the file."""

    def __init__(self, keys, out_channels: int) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.out_channels = out_channels

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            ids = torch.unique(torch.as_tensor(d[key]))
            bad = [int(i) for i in ids if i < 0 or i >= self.out_channels or i != int(i)]
            if bad:
                raise DataError(source_name(d, key), f"label ids {bad[:8]} lie outside 0…{self.out_channels - 1} "
                                                     f"(model.out_channels={self.out_channels}); set data.label_map")
        return d


def label_transforms(cfg: FinetuneConfig) -> list:
    """Label remapping, the id check, and BraTS region conversion, as configured."""
    out = []
    if cfg.data.label_map:
        out.append(RemapLabelsd("label", cfg.data.label_map))
    if cfg.data.regions == "brats":
        if cfg.data.brats_labels is None:
            raise SubforeError("data.regions 'brats' needs data.brats_labels (msd or brats) or a dataset.json that "
                               "names its labels")
        out.append(BratsRegionsd("label", cfg.data.brats_labels))
    else:
        out.append(CheckLabelsd("label", cfg.model.out_channels))
    return out


def train_transforms(cfg: FinetuneConfig, preset: Preset) -> Compose:
    """BTCV recipe: preprocess, foreground crop, pos/neg (or class-balanced) crops, flips, rot90, intensity jitter."""
    d = cfg.data
    keys = ["image", "label"]
    t = preprocess(preset, keys) + label_transforms(cfg)
    if d.foreground_crop:
        t.append(CropForegroundd(keys, source_key="image", allow_smaller=True))
    t.append(SpatialPadd(keys, spatial_size=list(d.roi)))
    if cfg.sigmoid:
        t.append(RandSpatialCropSamplesd(keys, roi_size=list(d.roi), num_samples=d.samples_per_volume, random_size=False))
    elif d.crop == "classes":
        t.append(RandCropByLabelClassesd(keys, "label", spatial_size=list(d.roi), num_classes=cfg.model.out_channels,
                                         num_samples=d.samples_per_volume, allow_smaller=True, warn=False))
    else:
        t.append(RandCropByPosNegLabeld(keys, "label", spatial_size=list(d.roi), pos=1, neg=1,
                                        num_samples=d.samples_per_volume, image_key="image", image_threshold=0,
                                        allow_smaller=True))
    t += [
        RandFlipd(keys, prob=0.2, spatial_axis=0),
        RandFlipd(keys, prob=0.2, spatial_axis=1),
        RandFlipd(keys, prob=0.2, spatial_axis=2),
    ]
    if d.roi[0] == d.roi[1]:  # a quarter turn of a non-square crop changes its shape, and batches no longer stack
        t.append(RandRotate90d(keys, prob=0.2, max_k=3))
    t += [
        RandScaleIntensityd("image", factors=0.1, prob=0.1),
        RandShiftIntensityd("image", offsets=0.1, prob=0.1),
    ]
    return Compose(t)


def eval_transforms(cfg: FinetuneConfig, preset: Preset, with_label: bool = True) -> Compose:
    """Preprocess the whole volume (and its label) for sliding-window inference."""
    keys = ["image", "label"] if with_label else ["image"]
    t = preprocess(preset, keys)
    if with_label:
        t += label_transforms(cfg)
    return Compose(t)


def build_seg_net(cfg: FinetuneConfig) -> torch.nn.Module:
    m = cfg.model
    return build_backbone(m.name, cfg.data.channels, m.out_channels, cfg.data.roi, m.feature_size, m.use_v2,
                          m.checkpointing, m.hidden_size, m.mlp_dim, m.num_heads, m.dropout, m.nnunet_plans,
                          m.nnunet_configuration)


def predict_volume(net: torch.nn.Module, image: torch.Tensor, roi, overlap: float, sw_batch_size: int,
                   sigmoid: bool, precision: str = "32") -> torch.Tensor:
    """Sliding-window prediction of one (1, C, D, H, W) volume → labels (1, 1, D, H, W) or regions (1, K, …) bool.

    precision: ``32``, or ``bf16``/``fp16`` autocast (GPU inference).
    """
    device = next(net.parameters()).device
    dtypes = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise SubforeError(f"precision must be one of {', '.join(dtypes)}, got {precision!r}")
    with torch.no_grad(), torch.autocast(device.type, dtype=dtypes[precision] or torch.float32,
                                         enabled=dtypes[precision] is not None):
        logits = sliding_window_inference(image.to(device), list(roi), sw_batch_size, net, overlap=overlap,
                                          mode="gaussian")
    logits = torch.as_tensor(logits).float()
    if sigmoid:
        return logits.sigmoid() > 0.5
    return logits.argmax(1, keepdim=True)


class SegmentationModel(RunModule):
    """DiceCE segmentation training with sliding-window validation (mean foreground Dice)."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        super().__init__(cfg.seed, cfg.train.max_bad_steps)
        self.cfg = cfg
        self.save_hyperparameters({"config": cfg.model_dump(mode="json"), "kind": "subfore-finetune"})
        self.net = build_seg_net(cfg)
        self.loss = DiceCELoss(to_onehot_y=not cfg.sigmoid, softmax=not cfg.sigmoid, sigmoid=cfg.sigmoid)

    def training_step(self, batch, batch_idx):
        x, y = torch.as_tensor(batch["image"]).float(), torch.as_tensor(batch["label"]).float()
        loss = self.loss(self.net(x), y)
        self.note_loss(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, batch_size=x.shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        k = self.cfg.model.out_channels - (0 if self.cfg.sigmoid else 1)
        # Per class: sum of Dice over the cases where the class is present, and their count; then cases scored.
        self._dice_sum = torch.zeros(2 * k + 1, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx):
        x, y = torch.as_tensor(batch["image"]).float(), torch.as_tensor(batch["label"])
        w = torch.as_tensor(batch["weight"]).to(self.device, torch.float64)  # 0 for a rank's padding copy
        pred = predict_volume(self.net, x, self.cfg.data.roi, self.cfg.finetune.sw_overlap,
                              self.cfg.finetune.sw_batch_size, self.cfg.sigmoid)
        k = self.cfg.model.out_channels
        if self.cfg.sigmoid:
            dice = compute_dice(pred.float(), y.float().to(pred.device), include_background=True, ignore_empty=True)
        else:
            onehot = lambda t: torch.nn.functional.one_hot(t[:, 0].long(), k).permute(0, 4, 1, 2, 3).float()  # noqa: E731
            dice = compute_dice(onehot(pred), onehot(y.to(pred.device)), include_background=False, ignore_empty=True)
        dice = dice.double().to(self.device)  # (B, classes), NaN where the class is absent from the label
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
        opt = torch.optim.AdamW(self.net.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, o.warmup_steps, t.max_steps, o.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ValLog(Callback):
    """Rank 0 appends the training loss at logged steps and validation Dice to RUN_DIR/metrics.jsonl."""

    def __init__(self, run_dir: Path, log_every: int) -> None:
        self.run_dir, self.log_every = run_dir, log_every

    def on_train_batch_end(self, trainer, module: SegmentationModel, outputs, batch, batch_idx):
        step = trainer.global_step
        if trainer.is_global_zero and module.stepped and (step % self.log_every == 0 or step == 1):
            append_jsonl(self.run_dir / "metrics.jsonl", {"step": step, "loss": module.step_loss()})

    def on_validation_end(self, trainer, module):
        m = trainer.callback_metrics
        if trainer.is_global_zero and not trainer.sanity_checking and "val/dice" in m:
            append_jsonl(self.run_dir / "metrics.jsonl", {"step": trainer.global_step, "val_dice": float(m["val/dice"]),
                                                          "val_cases": int(m["val/cases"])})


def finetune_cases(cfg: FinetuneConfig) -> tuple[list[dict], list[dict] | None]:
    """(training cases, validation cases or None) as the config selects them: split, holdout, then limit_train."""
    d = cfg.data
    items = load_datalists(d.train, d.train_split)
    missing = [i["image"] for i in items if "label" not in i]
    if missing:
        raise DataError(missing[0], "has no label: finetuning needs an image/label pair for every training case")
    source = d.train if isinstance(d.train, str) else d.train[0]
    val_items = None
    if d.holdout:
        if d.holdout >= len(items):
            raise DataError(source, f"data.holdout {d.holdout} leaves no training case (the '{d.train_split}' split "
                                    f"has {len(items)})")
        items, val_items = items[: -d.holdout], items[-d.holdout :]
    if d.limit_train:
        items = items[: d.limit_train]
    if d.val:
        val_items = load_datalists(d.val, d.val_split)
        if not val_items:
            raise DataError(d.val if isinstance(d.val, str) else d.val[0], f"the '{d.val_split}' split is empty")
        no_label = [i["image"] for i in val_items if "label" not in i]
        if no_label:
            raise DataError(no_label[0], "validation case without a label")
    return items, val_items


def finetune(cfg: FinetuneConfig, pretrained: str | Path | None = None, resume: str | Path | None = None) -> Path:
    """Finetune (or resume) a segmentation network; return the checkpoint ``finetune.select`` names (best or last).

    Raises :class:`~subfore.engine.Preempted` after saving ``last.ckpt`` when SIGTERM/SIGUSR1 stopped the run.
    """
    d = cfg.data
    check_roi(cfg.model.name, d.roi, None, cfg.model.nnunet_plans, cfg.model.nnunet_configuration)
    run_dir = Path(cfg.run_dir)
    ckpt_path = resolve_resume(run_dir, resume)
    pl.seed_everything(cfg.seed, verbose=False)
    ensure_phantoms(cfg)
    preset = d.preset_obj()
    if d.regions == "brats":
        d.brats_labels = resolve_convention(d.brats_labels, [d.train] if isinstance(d.train, str) else d.train)
    items, val_items = finetune_cases(cfg)
    model = SegmentationModel(cfg)
    pretrained = pretrained or cfg.finetune.pretrained
    t = cfg.train
    ckpt_dir = run_dir / "checkpoints"
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True, every_n_train_steps=t.ckpt_every),
        ValLog(run_dir, t.log_every),
    ]
    if val_items is not None and cfg.finetune.select == "best":
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/dice", mode="max",
                                         save_top_k=1, enable_version_counter=False))
    control = RunControl(run_dir)
    trainer = make_trainer(run_dir, t, callbacks + [control], validate=val_items is not None)
    rank, world = trainer.global_rank, trainer.world_size
    per_batch = check_fill(len(items), t.batch_size, d.samples_per_volume, world,
                           str(d.train if isinstance(d.train, str) else d.train[0]))
    train_ds = make_dataset(items, train_transforms(cfg, preset), d.cache_dir,
                            cache_key=(preset, "seg", d.label_map, d.regions, d.brats_labels, d.foreground_crop,
                                       list(d.roi)),
                            skip_bad=d.skip_bad)
    train = train_loader(train_ds, cfg.seed, per_batch, trainer, d.num_workers)
    val = None
    if val_items is not None:
        val_ds = make_dataset(shard(val_items, rank, world), eval_transforms(cfg, preset), d.cache_dir,
                              cache_key=(preset, "seg-eval", d.label_map, d.regions, d.brats_labels),
                              skip_bad=d.skip_bad)
        val = DataLoader(val_ds, batch_size=1, num_workers=min(1, d.num_workers))
    if pretrained and ckpt_path is None:
        from .weights import load_pretrained

        report = load_pretrained(model.net, pretrained, cfg.model.name, cfg.finetune.adapt_in_channels,
                                 cfg.finetune.min_encoder_loaded)
        if trainer.is_global_zero:
            print(report)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "pretrained_load.txt").write_text(str(report) + "\n")
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    control.fit(trainer, model, train_dataloaders=train, val_dataloaders=val, ckpt_path=ckpt_path)
    best = ckpt_dir / "best.ckpt"
    return best if cfg.finetune.select == "best" and best.exists() else control.last


def load_finetuned(path: str | Path, device: str | torch.device = "cpu") -> tuple[FinetuneConfig, torch.nn.Module]:
    """Rebuild the network and its config from a ``subfore finetune`` checkpoint."""
    path = Path(path)
    if not path.exists():
        raise SubforeError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise SubforeError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if hp.get("kind") != "subfore-finetune":
        raise SubforeError(f"{path}: not a 'subfore finetune' checkpoint (a pretraining checkpoint or encoder.pt "
                           f"cannot segment; finetune it first)")
    cfg = FinetuneConfig.model_validate(hp["config"])
    net = build_seg_net(cfg)
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise SubforeError(f"{path}: weights do not fit the architecture its config names ({str(exc).splitlines()[0]})") from None
    return cfg, net.to(device).eval()

