"""``subfore pretrain``: resolve the config, build the module and the Trainer, train, export the encoder.

    >>> from subfore.config import load_config
    >>> from subfore.pretrain import pretrain
    >>> pretrain(load_config("configs/pretrain/demo_cpu.yaml", ["train.max_steps=20"]))
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from ..config import PretrainConfig, dump_config
from ..errors import SubforeError
from ..engine.compile import compile_network
from ..engine.run import MetricsWriter, RunControl, RunFolder, autocast_of, check_run_dir, make_trainer, read_resume
from ..engine.sampling import check_fill
from ..io import append_jsonl, read_jsonl, write_text
from ..models.artifact import read_weights
from ..probe import Probe, load_into, plot_curve
from ..visualize import save_snapshot
from ..data.datalist import as_list, first_source
from .data import CropData, resolve
from .module import MaskedImageModel


class RunArtifacts(Callback):
    """Rank 0 writes snapshots, encoder.pt beside each checkpoint, and the linear probe's Dice (``probe_dice``)
    every ``probe.every`` steps and at the last step (metrics.jsonl rows come from MetricsWriter); the other ranks
    wait for it in a barrier at those steps."""

    def __init__(self, run_dir: Path, ckpt_every: int, cfg: PretrainConfig | None = None) -> None:
        self.run_dir = run_dir
        self.ckpt_every = ckpt_every
        self.cfg = cfg
        self._probe = None

    def _probe_now(self, trainer, pl_module: MaskedImageModel) -> None:
        cfg, step = self.cfg, trainer.global_step
        if self._probe is None:
            self._probe = Probe(cfg.probe, cfg.model, cfg.data.channels, cfg.data.roi, cfg.data.preset_obj(),
                                pl_module.device, precision=autocast_of(trainer.precision))
        net = self._probe.network()
        load_into(net, pl_module.backbone.encoder_state(pl_module.net), cfg.model.name, self.run_dir,
                  cfg.model.encoding)
        row = {"step": step, "probe_dice": self._probe.run(net)["mean_dice"]}
        metrics = self.run_dir / "metrics.jsonl"
        base = next((r["probe_baseline"] for r in read_jsonl(metrics) if "probe_baseline" in r), None)
        if base is None:
            base = row["probe_baseline"] = self._probe.baseline()["mean_dice"]  # the same head on a random init, once
        append_jsonl(metrics, row)
        pl_module.probe_score = {"step": step, "mean_dice": row["probe_dice"], "random_init_mean_dice": base,
                                 "protocol": cfg.probe.model_dump(mode="json")}
        plot_curve(metrics, self.run_dir / "probe_curve.png")

    def on_train_batch_end(self, trainer, pl_module: MaskedImageModel, outputs, batch, batch_idx) -> None:
        if not pl_module.stepped:
            return
        step = trainer.global_step
        views, pl_module.last_views = pl_module.last_views, None  # set on every rank at the same steps
        export = step % self.ckpt_every == 0
        p = self.cfg.probe if self.cfg is not None else None
        probe = p is not None and ((p.every and step % p.every == 0) or step == trainer.max_steps)
        if views is None and not export and not probe:
            return
        if trainer.is_global_zero:
            if views is not None:
                save_snapshot(views, pl_module.masker.size, self.run_dir / "snapshots" / f"step_{step:06d}.png", step)
            if export:
                pl_module.export_encoder(self.run_dir)
            if probe:
                self._probe_now(trainer, pl_module)
        # Every rank decides the same and waits here for rank 0's side work: a wait bounded by the process group's
        # timeout (train.timeout_min), here rather than inside the next step's collective.
        trainer.strategy.barrier("subfore-rank0-side-work")


def pretrain(cfg: PretrainConfig, resume: str | Path | None = None) -> Path:
    """Run (or resume) a pretraining; return the path of the exported encoder.pt.

    resume: a checkpoint path, ``"last"`` for RUN_DIR/checkpoints/last.ckpt, or ``"auto"`` (last.ckpt if present).
    Raises :class:`~subfore.engine.Preempted` after saving ``last.ckpt`` when SIGTERM/SIGUSR1 stopped the run.
    """
    run_dir = check_run_dir(cfg.run_dir)
    if cfg.init_from and resume is not None and str(resume) != "auto":
        raise SubforeError(f"init_from {cfg.init_from}: starts a new run, --resume continues one from its checkpoint; "
                           f"give one (--resume-if-exists takes both: init on the first start, resume after)")
    point = read_resume(run_dir, resume, "pretrain")
    ckpt_path = point.path
    # Read before the crop store is built: a weights file that is unreadable or names code is refused first.
    init = read_weights(cfg.init_from) if cfg.init_from and ckpt_path is None else None
    pl.seed_everything(cfg.seed, verbose=False)
    plan = resolve(cfg, read_data=False)
    model = MaskedImageModel(cfg, plan.backbone, (plan.threshold, plan.window))
    # Before any data is read: a checkpoint of another network is refused in one line (not by Lightning's load).
    point.check_fits(model, cfg.model.name)
    read = resolve(cfg)  # the datalists (and the built-in phantoms, generated when asked for and absent)
    plan.train_items, plan.val_items = read.train_items, read.val_items
    model.data_summary = {"volumes": len(plan.train_items), "sources": [str(s) for s in as_list(cfg.data.train)]}
    # Before the Trainer starts anything: a file that does not fit is refused first. Resuming, the checkpoint's
    # weights supersede the initial ones.
    report = model.init_weights(init) if init is not None else None
    t = cfg.train
    # The student only: the EMA teacher (a copy made with the module) runs eagerly, under no_grad, once a step.
    compile_network(model.net, t.compile)
    d = cfg.data
    folder = RunFolder(run_dir, keep=[d.cache_dir, d.phantoms.dir if d.phantoms else None])  # before any write
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_top_k=0, save_last=True,
                                 every_n_train_steps=t.ckpt_every, save_on_train_epoch_end=False)
    control = RunControl(run_dir, on_end=lambda: model.export_encoder(run_dir))
    trainer = make_trainer(run_dir, t, [checkpoint, MetricsWriter(run_dir), RunArtifacts(run_dir, t.ckpt_every, cfg),
                                        control], cfg.data.val is not None)
    # Before launching anything: fail without data, say once when a step must draw a volume twice.
    check_fill(len(plan.train_items), t.batch_size, d.samples_per_volume, trainer.world_size, first_source(d.train),
               warn=trainer.is_global_zero)
    folder.owner = trainer.is_global_zero
    with folder:  # a failure before the run's first checkpoint takes away what it wrote
        if report is not None and trainer.is_global_zero:
            print(report)
            write_text(run_dir / "init_load.txt", str(report) + "\n")
        if trainer.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, run_dir / "config.yaml")
        control.fit(trainer, model, datamodule=CropData(plan), ckpt_path=ckpt_path)
    return run_dir / "encoder.pt"
