"""Run configurations: YAML files validated by pydantic, with dotted ``--set key=value`` overrides.

Unknown keys and wrong types are rejected with the key's dotted name.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .data.presets import Preset
from .errors import ConfigError
from .masking import REGISTRY

T = TypeVar("T", bound=BaseModel)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PhantomSource(Strict):
    """Generate phantoms into ``dir`` when its dataset.json is absent (the built-in default data)."""

    dir: str = "data/phantoms"
    n: int = Field(8, ge=1)
    seed: int = 0
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5)


class DataConfig(Strict):
    train: str | list[str] = Field(..., description="dataset.json, nnU-Net folder, image folder or glob (or a list)")
    val: str | list[str] | None = None
    train_split: Literal["training", "validation", "test"] = "training"
    val_split: Literal["training", "validation", "test"] = "validation"
    preset: Literal["ct", "mri", "nnunet"] = Field(
        "ct", description="nnunet: spacing, normalisation and axis order from model.nnunet_plans (docs/nnunet.md)")
    spacing: tuple[float, float, float] | None = None
    window: tuple[float, float, float, float] | None = Field(None, description="a_min, a_max, b_min, b_max")
    channels: int = Field(1, ge=1)
    roi: tuple[int, int, int] = (96, 96, 96)
    samples_per_volume: int = Field(1, ge=1, description="random crops taken from each loaded volume")
    cache_dir: str | None = Field(".cache/subfore", description="pretraining: the crop store (subfore preprocess) "
                                  "lives here; finetuning: MONAI's PersistentDataset cache; null: no cache")
    num_workers: int = Field(2, ge=0)
    skip_bad: bool = False
    phantoms: PhantomSource | None = None
    # (plans, configuration) behind preset nnunet: the model section names them; set by the run config's validator.
    _nnunet: tuple[str, str] | None = PrivateAttr(None)

    def link_plans(self, plans: str, configuration: str) -> None:
        self._nnunet = (str(plans), configuration)

    def preset_obj(self) -> Preset:
        if self.preset == "nnunet":
            # The plans decide spacing and intensities; data.spacing and data.window do not apply.
            from .nnunet import preset_from_plans

            if self._nnunet is None:
                raise ConfigError("data.preset nnunet needs model.nnunet_plans (the nnU-Net plans JSON)")
            return preset_from_plans(*self._nnunet, channels=self.channels)
        extra: dict[str, Any] = {"modality": self.preset, "channels": self.channels}
        if self.spacing:
            extra["spacing"] = self.spacing
        if self.window:
            extra.update(zip(("a_min", "a_max", "b_min", "b_max"), self.window))
        return Preset(**extra)


class PretrainData(DataConfig):
    """Pretraining data: crops come from the chunked store under ``cache_dir`` (docs/data.md)."""

    store_dtype: Literal["float16", "float32"] = Field("float16", description="the store's image dtype")
    crop: Literal["anywhere", "body"] = Field(
        "anywhere", description="body: random crops stay inside each volume's body bounding box")


class ModelConfig(Strict):
    name: Literal["swinunetr", "unetr", "basicunet", "resenc", "resenc_l"] = "swinunetr"
    feature_size: int = Field(48, ge=1)
    use_v2: bool = True
    checkpointing: bool = Field(False, description="gradient checkpointing (SwinUNETR): less memory, more time")
    # UNETR's ViT (ignored by the others).
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_heads: int = 12
    dropout: float = 0.0
    # nnU-Net (resenc: the network; data.preset nnunet: the preprocessing). resenc_l is fixed and needs no plans.
    nnunet_plans: str | None = Field(None, description="nnU-Net plans JSON, e.g. nnUNetResEncUNetLPlans.json")
    nnunet_configuration: str = Field("3d_fullres", description="the plans' configuration to build")

    @model_validator(mode="after")
    def _plans(self) -> "ModelConfig":
        if self.name == "resenc" and not self.nnunet_plans:
            raise ValueError("model.name resenc is built from an nnU-Net plans file: set model.nnunet_plans")
        return self


_HU = re.compile(r"^\s*(-?\d+(\.\d*)?)\s*hu\s*$", re.IGNORECASE)


class MaskingConfig(Strict):
    strategy: str = "foreground"
    ratio: float = Field(0.6, ge=0.0, le=1.0)
    subvolume_size: int = Field(16, ge=1)
    threshold: float | str = Field(0.1, description="λ normalised, '-132.5 HU', or 'otsu'")
    fill: Literal["noise", "zero", "mean", "token"] = "noise"
    exact: bool = True
    options: dict[str, Any] = Field(default_factory=dict, description="extra generator options")
    # Teacher-guided strategies (anatomask, hpm).
    gate: Literal["foreground"] | None = Field(None, description="only foreground subvolumes are candidates")
    r0: float = Field(0.0, ge=0, le=1, description="hard share of the mask at step 0")
    rT: float = Field(0.5, ge=0, le=1, description="hard share of the mask at train.max_steps")
    schedule: Literal["easy-to-hard", "hard-to-easy"] = "easy-to-hard"
    # AnatoMask's published teacher: EMA 0.999 → 0.9999 over the first quarter of training, then held.
    ema_momentum: float = Field(0.999, ge=0, le=1, description="teacher EMA momentum at step 0")
    ema_momentum_end: float = Field(0.9999, ge=0, le=1, description="momentum from ema_ramp_fraction of training on")
    ema_ramp: Literal["cosine", "linear"] = "cosine"
    ema_ramp_fraction: float = Field(0.25, gt=0, le=1, description="share of train.max_steps the ramp takes")
    predictor_weight: float = Field(1.0, ge=0, description="hpm: weight of the loss-predictor ranking loss")
    max_pairs: int = Field(256, ge=1, description="hpm: ranking pairs sampled per sample")

    @field_validator("strategy")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in REGISTRY:
            raise ValueError(f"unknown strategy {v!r}; registered: {', '.join(sorted(REGISTRY))}")
        return v

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float | str) -> float | str:
        if isinstance(v, str) and v != "otsu" and not _HU.match(v):
            raise ValueError(f"expected a number, a value in HU such as '-132.5 HU', or 'otsu'; got {v!r}")
        return v

    def threshold_kwargs(self) -> dict[str, Any]:
        """``threshold=`` or ``threshold_hu=`` for the foreground generator."""
        if isinstance(self.threshold, str) and self.threshold != "otsu":
            return {"threshold": None, "threshold_hu": float(_HU.match(self.threshold).group(1))}  # type: ignore[union-attr]
        return {"threshold": self.threshold}


class OptimConfig(Strict):
    lr: float | None = Field(None, gt=0, description="default: 8e-4 SwinUNETR, 1e-4 UNETR, 1e-3 BasicUNet")
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")


class TrainConfig(Strict):
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(4, ge=1, description="crops per optimiser step per device (before accumulation)")
    precision: str = Field("auto", description="auto: bf16-mixed on GPUs that support it, else 32")
    grad_clip: float | None = Field(1.0, gt=0)
    accumulate: int = Field(1, ge=1)
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = Field(1, ge=1)
    ckpt_every: int = Field(500, ge=1)
    snapshot_every: int = Field(0, ge=0, description="0 disables snapshots")
    log_every: int = Field(10, ge=1)
    val_every: int = Field(500, ge=1)
    max_bad_steps: int = Field(10, ge=1)
    progress_bar: bool = True


class ProbeSettings(Strict):
    """The probe's fixed protocol: labelled data, which split trains the head and which is scored, and its budget."""

    data: str | list[str] = Field(..., description="labelled datalist(s)")
    split: Literal["training", "validation", "test"] = "training"
    test_data: str | list[str] | None = Field(None, description="the scored datalist(s); default: data")
    test_split: Literal["training", "validation", "test"] = "validation"
    label_map: dict[int, int] | None = Field(None, description="{src: dst}; unlisted ids become background")
    limit: int | None = Field(None, ge=1, description="train the head on the first N volumes only")
    steps: int = Field(300, ge=1, description="optimiser steps of the linear head")
    voxels: int = Field(4096, ge=16, description="class-balanced voxels per step, and the most kept per class "
                        "of each training volume")
    lr: float = Field(0.05, gt=0)
    seed: int = 0
    sw_batch_size: int = Field(4, ge=1)
    every: int = Field(0, ge=0, description="pretraining only: probe every N steps (0: at the end only)")


DEFAULT_LR = {"swinunetr": 8e-4, "unetr": 1e-4, "basicunet": 1e-3, "resenc": 1e-3, "resenc_l": 1e-3}


class PretrainConfig(Strict):
    """Everything ``subfore pretrain`` needs; see configs/pretrain/*.yaml."""

    run_dir: str = "runs/pretrain"
    seed: int = 0
    data: PretrainData
    model: ModelConfig = Field(default_factory=ModelConfig)
    masking: MaskingConfig = Field(default_factory=MaskingConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    probe: ProbeSettings | None = Field(None, description="a linear probe of the frozen network during pretraining")

    @model_validator(mode="after")
    def _defaults(self) -> "PretrainConfig":
        return fill_lr_check_batch(self, DEFAULT_LR)

    def foreground_threshold(self) -> float | str:
        """λ as pretraining applies it: in the preset's normalised units (a HU value converted), or "otsu"."""
        thr = self.masking.threshold_kwargs()
        try:
            threshold, _ = self.data.preset_obj().foreground_threshold(thr.get("threshold"), thr.get("threshold_hu"))
        except ValueError as exc:
            raise ConfigError(f"masking.threshold {self.masking.threshold!r}: {exc}") from None
        return threshold if isinstance(threshold, str) else float(threshold)


def fill_lr_check_batch(cfg, lr_by_model: dict[str, float]):
    """Default ``optim.lr`` per backbone; ``train.batch_size`` counts crops, so it must split into whole volumes."""
    if cfg.optim.lr is None:
        cfg.optim.lr = lr_by_model[cfg.model.name]
    if cfg.train.batch_size % cfg.data.samples_per_volume:
        raise ValueError(f"train.batch_size ({cfg.train.batch_size}) counts crops and must be a multiple of "
                         f"data.samples_per_volume ({cfg.data.samples_per_volume})")
    from .nnunet import link_config

    link_config(cfg)  # data.preset nnunet reads model.nnunet_plans
    return cfg


def _format_errors(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        elif e["type"] == "missing":
            parts.append(f"missing key '{key}'")
        else:
            parts.append(f"'{key}': {e['msg']}" + (f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""))
    return f"{source}: " + "; ".join(parts)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``dotted='a.b'``, creating levels as needed."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {} if node.get(k) is None else node[k]
            if not isinstance(node[k], dict):
                raise ConfigError(f"--set {dotted}: '{k}' is not a section")
        node = node[k]
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'masking.ratio=0.5' → ('masking.ratio', 0.5); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None, overrides: list[str] | None = None, cls: type[T] = PretrainConfig,
                base: dict | None = None) -> T:
    """Read YAML ``path`` (or start from ``base``), apply ``--set`` overrides, validate into ``cls``."""
    tree: dict = copy.deepcopy(base) if base else {}
    source = str(path) if path else "config"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{p}: no such config file")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level")
        tree.update(loaded)
    for text in overrides or []:
        set_dotted(tree, *parse_override(text))
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    tmp.replace(p)
