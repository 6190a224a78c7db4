"""Run configurations: YAML files validated by pydantic, with dotted ``--set key=value`` overrides.

Unknown keys and wrong types are rejected with the key's dotted name.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_serializer,
                      model_validator)

from .data.phantoms import BTCV_NAMES
from .data.plans import preset_from_plan
from .data.presets import Preset
from .errors import ConfigError, SubforeError
from .io import write_text
from .masking import REGISTRY, Window
from .models.nnunet.architecture import check as check_architecture
from .models.nnunet.network import extract_architecture, resolve_plans
from .models.registry import BACKBONES

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
    # The preset behind preset nnunet, read from the plans the model section names by the run config's validator.
    _nnunet: Preset | None = PrivateAttr(None)

    def link_plans(self, extract: dict) -> None:
        """The preprocessing of data.preset nnunet from the plans the model section holds (read when the run was
        resolved): spacing, normalisation, axis order."""
        name = extract["configuration"]
        self._nnunet = preset_from_plan(extract, extract["configurations"][name], extract.get("plans_file", "plans"),
                                        name, channels=self.channels)

    def preset_obj(self) -> Preset:
        if self.preset == "nnunet":
            # The plans decide spacing and intensities; data.spacing and data.window do not apply.
            if self._nnunet is None:
                raise ConfigError("data.preset nnunet needs model.nnunet_plans (the nnU-Net plans JSON)")
            return self._nnunet
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
    name: str = Field("swinunetr", description="a registered backbone (models/registry.py): swinunetr, unetr, "
                      "basicunet, resenc, resenc_l")
    feature_size: int = Field(48, ge=1)
    use_v2: bool = True
    checkpointing: bool = Field(False, description="gradient checkpointing of the encoder (every backbone): less "
                                "memory, more time")
    # UNETR's ViT (ignored by the others).
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_heads: int = 12
    dropout: float = 0.0
    encoding: Literal["dense", "visible"] = Field(
        "dense", description="pretraining: dense (SimMIM: masked voxels filled, the whole crop encoded) or visible "
        "(MAE: the ViT encodes the visible patches only; unetr); finetuning always encodes everything")
    # nnU-Net (resenc: the network; data.preset nnunet: the preprocessing). resenc_l is fixed and needs no plans.
    nnunet_plans: str | None = Field(None, description="nnU-Net plans JSON, e.g. nnUNetResEncUNetLPlans.json")
    nnunet_configuration: str = Field("3d_fullres", description="the plans' configuration to build")
    nnunet_architecture: dict[str, Any] | None = Field(
        None, description="resenc without plans: an nnU-Net 'architecture' entry (network_class_name, arch_kwargs, "
        "_kw_requires_import), as read from an nnssl checkpoint; finetuning with none of these three: the "
        "pretrained file's own")
    nnunet_plan: dict[str, Any] | None = Field(
        None, description="written when the run is resolved, not by hand: what the run keeps of model.nnunet_plans "
        "(the configuration's architecture and preprocessing), so its checkpoints need no plans file")

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in BACKBONES:
            raise ValueError(f"unknown backbone {v!r}; registered: {', '.join(BACKBONES)}")
        return v

    @model_serializer(mode="wrap")
    def _without_inline(self, handler):
        # Configs and encoder.json files of plans-built or MONAI models dump as before the inline architecture.
        data = handler(self)
        for key in ("nnunet_architecture", "nnunet_plan"):
            if data.get(key) is None:
                data.pop(key, None)
        return data

    @model_validator(mode="after")
    def _plans(self) -> "ModelConfig":
        # Architectures are data: every name is checked against the allow-list here, nothing is imported.
        try:
            if self.nnunet_architecture is not None:
                if self.nnunet_plans:
                    raise SubforeError("model.nnunet_architecture and model.nnunet_plans both describe the network; "
                                       "keep one")
                check_architecture(self.nnunet_architecture, None, "model.nnunet_architecture.")
            if self.nnunet_plan is not None:
                extract_architecture(self.nnunet_plan, None)
        except SubforeError as exc:
            raise ValueError(str(exc)) from None
        return self


_HU = re.compile(r"^\s*(-?\d+(\.\d*)?)\s*hu\s*$", re.IGNORECASE)


class MaskingConfig(Strict):
    strategy: str = "foreground"
    ratio: float = Field(0.6, ge=0.0, le=1.0)
    subvolume_size: int = Field(16, ge=1)
    threshold: float | str = Field(0.1, description="λ normalised, '-132.5 HU', or 'otsu'")
    fill: Literal["noise", "zero", "mean", "token"] = "noise"
    exact: bool = True
    loss: Literal["l1", "mse"] = Field("l1", description="per-voxel error on masked voxels: l1 (SubFore) or mse (MAE)")
    norm_pix_loss: bool = Field(False, description="MAE's target: each patch (model.encoding visible: 16³ ViT "
                                "patch; dense: subvolume) normalised to zero mean and unit variance")
    options: dict[str, Any] = Field(default_factory=dict, description="extra generator options")
    # Teacher-guided strategies (anatomask, hpm).
    gate: Literal["foreground"] | None = Field(None, description="only foreground subvolumes are candidates")
    r0: float = Field(0.0, ge=0, le=1, description="hard share of the mask at step 0")
    rT: float = Field(0.5, ge=0, le=1, description="hard share of the mask at train.max_steps")
    schedule: Literal["easy-to-hard", "hard-to-easy"] = "easy-to-hard"
    # AnatoMask's published teacher: EMA 0.999 → 0.9999, raised linearly over the first quarter of training (its
    # code steps it once per epoch; here once per step), then held. cosine: the same ends, rising slower at first
    # (larger teacher updates early: 1 − m is 11 % larger a fifth of the way up the ramp).
    ema_momentum: float = Field(0.999, ge=0, le=1, description="teacher EMA momentum at step 0")
    ema_momentum_end: float = Field(0.9999, ge=0, le=1, description="momentum from ema_ramp_fraction of training on")
    ema_ramp: Literal["linear", "cosine"] = "linear"
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


class DecoderConfig(Strict):
    """The MAE decoder of ``model.encoding: visible`` (pretraining only; never exported).

    Defaults: 4 blocks × 384 wide, 12 heads. MAE's paper uses 8 × 512 beside ViT-L (1024 wide); here the encoder
    is UNETR's ViT-B (768), so MAE's ratio of half the encoder's width gives 384, and half MAE's depth, since MAE's
    fine-tuning accuracy hardly moves with decoder depth (84.8 % at 1 block, 84.9 % at 8; linear probing is what
    gains from depth). A 96³ crop has 216 tokens of 16³, about ImageNet's 196, so per step the decoder costs
    what MAE's does.
    """

    width: int = Field(384, ge=1)
    depth: int = Field(4, ge=1)
    heads: int = Field(12, ge=1)

    @model_validator(mode="after")
    def _heads(self) -> "DecoderConfig":
        if self.width % self.heads:
            raise ValueError(f"decoder.width ({self.width}) must be divisible by decoder.heads ({self.heads})")
        return self


class OptimConfig(Strict):
    lr: float | None = Field(None, gt=0, description="default: the backbone's pretrain_lr (models/registry.py)")
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
    compile: bool = Field(False, description="torch.compile the backbone (the first steps compile)")
    timeout_min: float = Field(60, gt=0, description="minutes a rank waits in a collective (the process group's "
                               "timeout), e.g. for rank 0's probe, before the job fails")


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


class ExportConfig(Strict):
    formats: list[Literal["pt", "safetensors"]] = Field(
        default_factory=lambda: ["pt", "safetensors"], min_length=1,
        description="the encoder's weight files: encoder.pt (a plain state_dict) and/or encoder.safetensors")


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
    export: ExportConfig = Field(default_factory=lambda: ExportConfig())
    decoder: DecoderConfig = Field(default_factory=DecoderConfig, description="model.encoding visible: the MAE decoder")
    init_from: str | None = Field(None, description="weights to start from (step 0, fresh optimiser): a subfore run "
                                  "or model folder, an nnssl checkpoint, nnU-Net or other weights files")

    @model_validator(mode="after")
    def _defaults(self) -> "PretrainConfig":
        if self.model.encoding == "visible":
            spec = BACKBONES[self.model.name]
            if spec.visible is None:
                with_vit = ", ".join(n for n, b in BACKBONES.items() if b.visible is not None)
                raise ValueError(f"model.encoding visible drops masked tokens before a ViT's blocks: "
                                 f"{self.model.name} has none; use model.name: {with_vit} or model.encoding: dense")
            if self.masking.subvolume_size % spec.patch_size:
                raise ValueError(f"model.encoding visible: masking.subvolume_size {self.masking.subvolume_size} "
                                 f"must be a multiple of the ViT's {spec.patch_size}³ patches (a subvolume is whole "
                                 f"patches)")
            if self.masking.fill != "noise":
                raise ValueError(f"model.encoding visible never fills masked voxels (masked patches are dropped and "
                                 f"the MAE decoder has its own mask token): remove masking.fill "
                                 f"{self.masking.fill!r}")
        return fill_lr_check_batch(self, "pretrain_lr")

    def foreground_threshold(self) -> tuple[float | str, Window | None]:
        """λ as pretraining applies it, in the preset's normalised units (a HU value converted) or "otsu", and the
        window λ was range-checked against (None for nnU-Net's z-scores)."""
        thr = self.masking.threshold_kwargs()
        try:
            threshold, window = self.data.preset_obj().foreground_threshold(thr.get("threshold"),
                                                                            thr.get("threshold_hu"))
        except ValueError as exc:
            raise ConfigError(f"masking.threshold {self.masking.threshold!r}: {exc}") from None
        return (threshold if isinstance(threshold, str) else float(threshold)), window


def fill_lr_check_batch(cfg, lr_kind: str):
    """Default ``optim.lr`` per backbone (its registry entry's ``lr_kind``); ``train.batch_size`` counts crops, so it
    must split into whole volumes; link the plans behind ``data.preset: nnunet``."""
    if cfg.optim.lr is None:
        cfg.optim.lr = getattr(BACKBONES[cfg.model.name], lr_kind)
    if cfg.train.batch_size % cfg.data.samples_per_volume:
        raise ValueError(f"train.batch_size ({cfg.train.batch_size}) counts crops and must be a multiple of "
                         f"data.samples_per_volume ({cfg.data.samples_per_volume})")
    link_config(cfg)
    return cfg


def link_config(cfg) -> None:
    """Cross-section settings of a run config: the plans behind ``data.preset: nnunet`` and its default λ.

    Reads no file: the plans come from ``model.nnunet_plan``, which :func:`resolve_run` fills.

    The default foreground threshold under this preset is "-132.5 HU" (the papers' λ = 0.1 in their −175…250 HU
    window) for CTNormalization, 'otsu' for the other schemes; it is written into the config, so config.yaml
    and resumed runs keep it.
    """
    data, model = cfg.data, cfg.model
    if data.preset != "nnunet":
        return
    if not model.nnunet_plans and model.nnunet_plan is None:
        raise ConfigError("data.preset nnunet takes the spacing and normalisation from model.nnunet_plans: set it "
                          "to the nnU-Net plans JSON")
    if model.nnunet_plan is None:
        return  # read when the run is resolved (load_config, resolve_backbone), not while validating
    data.link_plans(model.nnunet_plan)
    masking = getattr(cfg, "masking", None)
    if masking is not None and "threshold" not in masking.model_fields_set:
        masking.threshold = "-132.5 HU" if data.preset_obj().window is not None else "otsu"


# --- finetuning ---------------------------------------------------------------------------------------
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
    lr: float | None = Field(None, gt=0, description="default: the backbone's finetune_lr (models/registry.py)")
    weight_decay: float = Field(1e-5, ge=0)


class FinetuneTrainConfig(TrainConfig):
    batch_size: int = Field(8, ge=1, description="crops per step: 2 volumes × 4 crops (the seed's batch 2)")
    grad_clip: float | None = Field(None, gt=0)


class FinetuneConfig(Strict):
    """Everything ``subfore finetune`` needs; see configs/finetune/*.yaml."""

    run_dir: str = "runs/finetune"
    seed: int = 0
    data: FinetuneData
    model: SegModelConfig = Field(default_factory=SegModelConfig)
    finetune: FinetuneOptions = Field(default_factory=FinetuneOptions)
    optim: FinetuneOptim = Field(default_factory=FinetuneOptim)
    train: FinetuneTrainConfig = Field(default_factory=FinetuneTrainConfig)

    @model_validator(mode="after")
    def _defaults(self) -> "FinetuneConfig":
        fill_lr_check_batch(self, "finetune_lr")
        if self.model.encoding != "dense":
            raise ValueError("model.encoding visible is a pretraining setting; finetuning encodes the whole crop "
                             "(remove it: an MAE encoder loads into the dense network as it is)")
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
        if self.model.out_channels == 14:
            return [BTCV_NAMES[i] for i in range(14)]
        return ["background"] + [f"class_{i}" for i in range(1, self.model.out_channels)]


def format_errors(err: ValidationError, source: str, overrides: dict[str, str] | None = None) -> str:
    """One line for every error of ``err``, each under the source of its key: ``source`` (the file), or the
    ``--set`` that gave the key or a section above it (``overrides``: dotted key → the ``--set`` text)."""
    groups: dict[str, list[str]] = {}
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            part = f"unknown key '{key}'"
        elif e["type"] == "missing":
            part = f"missing key '{key}'"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            part = f"'{key}': {msg}" + (f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else "")
        given = [k for k in overrides or {} if key == k or key.startswith(k + ".")] if e["loc"] else []
        where = f"--set {overrides[max(given, key=len)]}" if given else source
        groups.setdefault(where, []).append(part)
    return "; ".join(f"{where}: " + "; ".join(parts) for where, parts in groups.items())


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
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if loaded is None:  # not taken as "all defaults": an empty file is a mistake (a wrong or truncated file)
            raise ConfigError(f"{p}: the config file is empty (no settings); give a config with its sections "
                              f"(see configs/)")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level")
        tree.update(loaded)
    given: dict[str, str] = {}  # dotted key → its --set text (the last one wins, as in the tree)
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
        given[key] = text
    try:
        cfg = cls.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_errors(err, source, given)) from None
    return resolve_run(cfg)


def resolve_run(cfg: T) -> T:
    """Read the nnU-Net plans a run config names, once, into ``model.nnunet_plan``, and link what they decide."""
    model = getattr(cfg, "model", None)
    if model is not None and getattr(model, "nnunet_plans", None):
        resolve_plans(model)
        link_config(cfg)
    return cfg


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
