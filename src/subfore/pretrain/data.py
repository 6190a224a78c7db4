"""Pretraining's data: the config resolved once (backbone, preset, λ, datalists), and its crops — from the
chunked store under ``data.cache_dir`` (built where it lacks volumes), or straight from the source files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import lightning.pytorch as pl

from ..config import PretrainConfig
from ..data.datalist import first_source, load_datalists
from ..data.dataset import make_dataset
from ..data.phantoms import ensure_phantoms
from ..data.presets import Preset
from ..data.store import StoreCrops, StoreSpec, preprocess_store, records_for, store_spec, wait_for_store
from ..data.transforms import center_transforms, pretrain_transforms
from ..engine.sampling import check_fill, make_loaders, shard
from ..errors import DataError
from ..masking import Window
from ..models.registry import Backbone, resolve_backbone


@dataclass
class PretrainPlan:
    """A pretraining config resolved once at the start of a run: what every later step reads."""

    cfg: PretrainConfig
    backbone: Backbone  # nnU-Net plans read once, ROI checked against it
    preset: Preset
    threshold: float | str  # λ in the preset's normalised units, or "otsu"
    window: Window | None  # what λ was range-checked against
    train_items: list[dict] = field(default_factory=list)
    val_items: list[dict] = field(default_factory=list)

    def store(self) -> StoreSpec:
        """The crop store under ``data.cache_dir`` for this preset and dtype."""
        return store_spec(self.cfg.data, self.preset, self.threshold, self.cfg.masking.subvolume_size)


def resolve(cfg: PretrainConfig, read_data: bool = True, check_roi: bool = True) -> PretrainPlan:
    """Check the crop against the backbone, resolve λ, generate the built-in phantoms if asked, read the datalists.

    read_data, check_roi: off for a caller that only samples crops (fingerprint), which reads its own datalist.
    """
    d = cfg.data
    backbone = resolve_backbone(cfg.model)
    if check_roi:
        backbone.check_roi(d.roi, cfg.masking.subvolume_size)
    threshold, window = cfg.foreground_threshold()
    plan = PretrainPlan(cfg, backbone, d.preset_obj(), threshold, window)
    if read_data:
        ensure_phantoms(d.phantoms)
        plan.train_items = load_datalists(d.train, d.train_split)
        plan.val_items = load_datalists(d.val, d.val_split) if d.val else []
        if d.val and not plan.val_items:
            raise DataError(first_source(d.val), f"the '{d.val_split}' split is empty")
    return plan


def crop_volumes(plan: PretrainPlan, items: list[dict], samples: int, *, rank: int = 0, world: int = 1,
                 also_build: Sequence[dict] = (), progress: bool = False):
    """Volumes whose ``draw(i, seed)`` gives ``samples`` random training crops of item i, as pretraining cuts them.

    With ``data.cache_dir``: this rank builds its shard of what the store lacks (``items`` and ``also_build``),
    waits for the other ranks' shards, then reads crops from the store. Without: crops from the source files.
    """
    d = plan.cfg.data
    if d.cache_dir is None:
        return make_dataset(items, pretrain_transforms(plan.preset, d.roi, samples), skip_bad=d.skip_bad)
    spec = plan.store()
    everything = list(items) + list(also_build)
    preprocess_store(spec, everything, workers=max(1, d.num_workers), shard=(rank, world), skip_bad=d.skip_bad,
                     progress=progress, rank=rank)
    wait_for_store(spec, everything, d.skip_bad)
    return StoreCrops(spec, records_for(spec, items, d.skip_bad), d.roi, samples, d.crop)


def validation_volumes(plan: PretrainPlan, rank: int, world: int):
    """This rank's share of the centre-crop validation volumes (each with its ``weight``), or None."""
    d = plan.cfg.data
    if not plan.val_items:
        return None
    if d.cache_dir is None:
        return make_dataset(shard(plan.val_items, rank, world), center_transforms(plan.preset, d.roi),
                            skip_bad=d.skip_bad)
    spec = plan.store()
    # Every rank sees the same records and failures once the store is complete: the same lists everywhere.
    val_ok = [item for item in plan.val_items if spec.record(item) is not None] if d.skip_bad else plan.val_items
    if not val_ok:
        return None
    mine = shard(val_ok, rank, world)
    return StoreCrops(spec, records_for(spec, mine, skip_bad=False), d.roi,
                      extras=[{"weight": item["weight"], "case": item["case"]} for item in mine])


class CropData(pl.LightningDataModule):
    """The loaders, built inside ``fit`` on every rank (after launch: each rank builds its own store shard)."""

    def __init__(self, plan: PretrainPlan) -> None:
        super().__init__()
        self.plan, self.loaders = plan, None

    def setup(self, stage: str) -> None:
        if self.loaders is not None:
            return
        d, t = self.plan.cfg.data, self.plan.cfg.train
        rank, world = self.trainer.global_rank, self.trainer.world_size
        volumes = crop_volumes(self.plan, self.plan.train_items, d.samples_per_volume, rank=rank, world=world,
                               also_build=self.plan.val_items, progress=t.progress_bar and rank == 0)
        per_batch = check_fill(len(volumes), t.batch_size, d.samples_per_volume, world, first_source(d.train))
        self.loaders = make_loaders(volumes, validation_volumes(self.plan, rank, world), self.plan.cfg.seed,
                                    per_batch, self.trainer, d.num_workers)

    def train_dataloader(self):
        return self.loaders[0]

    def val_dataloader(self):
        return self.loaders[1] if self.loaders[1] is not None else []
