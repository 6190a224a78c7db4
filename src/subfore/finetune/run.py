"""``subfore finetune``: segmentation finetuning (BTCV-style recipe) from pretrained weights, on Lightning.

    >>> from subfore.config import FinetuneConfig, load_config
    >>> from subfore.finetune import finetune
    >>> finetune(load_config("configs/finetune/btcv_swinunetr.yaml", [], FinetuneConfig), pretrained="runs/demo/encoder.pt")
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from ..config import FinetuneConfig, dump_config
from ..data.brats import resolve_convention
from ..data.phantoms import ensure_phantoms
from ..engine.compile import compile_network
from ..engine.run import MetricsWriter, RunControl, RunFolder, check_run_dir, make_trainer, read_resume
from ..io import write_text
from ..errors import SubforeError
from ..models.artifact import read_weights
from ..models.nnunet.network import network_from_weights
from ..models.registry import resolve_backbone
from ..models.weights import load_pretrained
from .data import finetune_cases, loaders
from .module import SegmentationModel


def finetune(cfg: FinetuneConfig, pretrained: str | Path | None = None, resume: str | Path | None = None) -> Path:
    """Finetune (or resume) a segmentation network; return the checkpoint ``finetune.select`` names (best or last).

    Raises :class:`~subfore.engine.Preempted` after saving ``last.ckpt`` when SIGTERM/SIGUSR1 stopped the run.
    """
    d = cfg.data
    run_dir = check_run_dir(cfg.run_dir)
    pretrained = pretrained or cfg.finetune.pretrained
    point = read_resume(run_dir, resume, "finetune")
    ckpt_path = point.path
    # Read first, before any data: a weights file that is unreadable or names code is refused before anything else.
    found = read_weights(pretrained) if pretrained and ckpt_path is None else None
    if network_from_weights(cfg.model) and found is not None:
        # As nnU-Net's PretrainedTrainer: the network is the one the weights file describes. The config (and every
        # checkpoint) then holds it inline, so the run does not need the file to rebuild its network.
        if found.architecture is None or found.family not in (None, "resenc"):
            raise SubforeError(f"{found.describe()}: names no nnU-Net architecture to build model.name resenc from; "
                               f"set model.nnunet_plans or model.nnunet_architecture")
        cfg.model.nnunet_architecture = found.architecture
    backbone = resolve_backbone(cfg.model)
    backbone.check_roi(d.roi)
    if ckpt_path is not None:
        # Before any data is read, a checkpoint of another network is refused in one line (not by Lightning's load).
        # The run's own module is built after the data, which completes its config (data.brats_labels).
        point.check_fits(SegmentationModel(cfg, backbone), cfg.model.name)
    pl.seed_everything(cfg.seed, verbose=False)
    ensure_phantoms(d.phantoms)
    preset = d.preset_obj()
    if d.regions == "brats":
        d.brats_labels = resolve_convention(d.brats_labels, [d.train] if isinstance(d.train, str) else d.train)
    items, val_items = finetune_cases(cfg)
    model = SegmentationModel(cfg, backbone)
    # Before the Trainer starts anything: weights that do not fit (or would run code) are refused first. Resuming,
    # the checkpoint's weights supersede them.
    report = None
    if found is not None:
        report = load_pretrained(model.net, found, cfg.model.name, cfg.finetune.adapt_in_channels,
                                 cfg.finetune.min_encoder_loaded, architecture=backbone.architecture)
    t = cfg.train
    compile_network(model.net, t.compile)
    ckpt_dir = run_dir / "checkpoints"
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True, every_n_train_steps=t.ckpt_every),
        MetricsWriter(run_dir),
    ]
    if val_items is not None and cfg.finetune.select == "best":
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/dice", mode="max",
                                         save_top_k=1, enable_version_counter=False))
    folder = RunFolder(run_dir, keep=[d.cache_dir, d.phantoms.dir if d.phantoms else None])  # before any write
    control = RunControl(run_dir)
    trainer = make_trainer(run_dir, t, callbacks + [control], validate=val_items is not None)
    train, val = loaders(cfg, preset, items, val_items, trainer)
    folder.owner = trainer.is_global_zero
    with folder:  # a failure before the run's first checkpoint takes away what it wrote
        if report is not None and trainer.is_global_zero:
            print(report)
            write_text(run_dir / "pretrained_load.txt", str(report) + "\n")
        if trainer.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, run_dir / "config.yaml")
        control.fit(trainer, model, train_dataloaders=train, val_dataloaders=val, ckpt_path=ckpt_path)
    best = ckpt_dir / "best.ckpt"
    return best if cfg.finetune.select == "best" and best.exists() else control.last
