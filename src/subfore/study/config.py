"""The study's config: arms, seeds, the finetuning data it names, test sets; and each arm's run configs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..config import FinetuneConfig, PhantomSource, ProbeSettings, Strict, load_config, set_dotted
from ..masking import REGISTRY

DEFAULT_ARMS = ["scratch", "random", "block", "foreground", "foreground+otsu", "anatomask", "hpm", "anatomask+gate"]
MODIFIERS = {"otsu": {"masking.threshold": "otsu"}, "gate": {"masking.gate": "foreground"},
             "visible": {"model.encoding": "visible"}, "dense": {"model.encoding": "dense"}}
# The papers' baselines by name, as the seeds' tables have them (UNETR: MAE 80.26, SimMIM 80.95, SubFore 81.77).
NAMED = {
    # MAE: the ViT encodes the visible patches only; ratio 0.75; MSE on per-patch normalised voxels.
    "mae": {"masking.strategy": "random", "masking.ratio": 0.75, "model.encoding": "visible", "masking.loss": "mse",
            "masking.norm_pix_loss": True},
    # SimMIM: masked voxels replaced by a learned token, the whole crop encoded; ratio 0.6; L1 on masked voxels.
    "simmim": {"masking.strategy": "random", "masking.ratio": 0.6, "model.encoding": "dense", "masking.fill": "token",
               "masking.loss": "l1"},
    "subfore": {"masking.strategy": "foreground"},
}


class TestSet(Strict):
    """A labelled test set: a datalist (``data`` + ``split``), or one ``image`` with its ``label``."""

    name: str
    data: str | list[str] | None = None
    image: str | None = None
    label: str | None = None
    split: str = "validation"
    label_map: dict[int, int] | None = Field(None, description="this set's ids → the finetuned model's ids")
    optional: bool = Field(False, description="skip (with a note) when the data is absent, e.g. ../shared/data")

    @model_validator(mode="after")
    def _source(self) -> "TestSet":
        if (self.data is None) == (self.image is None):
            raise ValueError(f"test '{self.name}': give either data (a labelled datalist) or image with label")
        if self.image is not None and self.label is None:
            raise ValueError(f"test '{self.name}': image needs its label")
        return self


class StudyFinetuneTrain(Strict):
    """The labelled cases finetuning trains on: a datalist and its split."""

    data: str | list[str]
    split: Literal["training", "validation", "test"] = "training"


class StudyFinetuneVal(Strict):
    """The cases that select the checkpoint: a datalist and split, or a ``holdout`` of the last N training cases."""

    data: str | list[str] | None = None
    split: Literal["training", "validation", "test"] = "validation"
    holdout: int | None = Field(None, ge=1, description="the last N cases of finetune_train (then not trained on)")

    @model_validator(mode="after")
    def _one(self) -> "StudyFinetuneVal":
        if (self.data is None) == (self.holdout is None):
            raise ValueError("give either data (with split) or holdout")
        return self


class PhantomSet(PhantomSource):
    """Phantoms a study generates when absent (``dir`` has no default here)."""

    dir: str


class StudySection(Strict):
    """The ``study:`` section: arms, seeds, data and the sweep."""

    study_dir: str = "runs/study"
    arms: list[str] = Field(default_factory=lambda: list(DEFAULT_ARMS))
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    phantoms: list[PhantomSet] = Field(default_factory=list, description="generated when absent")
    pretrain_data: list[str] = Field(..., description="unlabelled datalists (images only are used)")
    pretrain_data_optional: list[str] = Field(default_factory=list, description="used where present")
    finetune_train: StudyFinetuneTrain
    finetune_val: StudyFinetuneVal | None = Field(None, description="none: no validation, select must be 'last'")
    select: Literal["best", "last"] = Field("best", description="the finetuned checkpoint that is scored")
    test: list[TestSet]
    sweep: dict[str, list[Any]] | None = Field(None, description="one key → values, e.g. {masking.ratio: [0.4, 0.8]}")
    probe: ProbeSettings | None = Field(None, description="a linear probe of every arm's frozen network (scratch: "
                                        "its random init), a second read-out beside finetune Dice")
    label_fractions: list[float] | None = Field(
        None, description="labelled finetuning cases per run: a count (1, 2, 4; 1.0 is one case) or a share below 1 "
        "of finetune_train (0.25, rounded half up, at least 1); every arm and seed pretrains once and finetunes at "
        "each")

    @field_validator("label_fractions")
    @classmethod
    def _fractions(cls, values):
        if values is None:
            return None
        if not values:
            raise ValueError("label_fractions: give at least one count or share, or leave it out")
        for v in values:
            if v <= 0 or (v >= 1 and v != int(v)):
                raise ValueError(f"label_fractions: {v} is neither a share in (0, 1) nor a whole number of cases")
        return values

    @field_validator("arms")
    @classmethod
    def _arms(cls, arms: list[str]) -> list[str]:
        for arm in arms:
            parse_arm(arm)
        return arms

    @field_validator("sweep")
    @classmethod
    def _one_key(cls, sweep):
        if sweep is not None and len(sweep) != 1:
            raise ValueError("sweep takes exactly one key (an ablation over one setting)")
        return sweep

    @model_validator(mode="after")
    def _selection(self) -> "StudySection":
        if self.select == "best" and self.finetune_val is None:
            raise ValueError("select 'best' needs finetune_val (a datalist or a holdout); or select: last")
        return self


class StudyConfig(Strict):
    """``subfore study`` config: ``study`` plus partial ``pretrain`` and ``finetune`` configs shared by every arm."""

    study: StudySection
    pretrain: dict[str, Any] = Field(default_factory=dict)
    finetune: dict[str, Any] = Field(default_factory=dict)


def parse_arm(arm: str) -> dict[str, Any] | None:
    """Pretraining overrides for an arm name (None for ``scratch``): a strategy or a named baseline (``mae``,
    ``simmim``, ``subfore``) with ``+`` modifiers (``otsu``, ``gate``, ``visible``, ``dense``)."""
    base = arm.split("[")[0]
    if base == "scratch":
        return None
    strategy, *mods = base.split("+")
    if strategy in NAMED:
        out: dict[str, Any] = dict(NAMED[strategy])
    elif strategy in REGISTRY:
        out = {"masking.strategy": strategy}
    else:
        raise ValueError(f"arm {arm!r}: unknown strategy {strategy!r}; registered: {', '.join(sorted(REGISTRY))}; "
                         f"named: {', '.join(NAMED)}")
    for m in mods:
        if m not in MODIFIERS:
            raise ValueError(f"arm {arm!r}: unknown modifier {m!r}; known: {', '.join(MODIFIERS)}")
        out.update(MODIFIERS[m])
    return out


def expand_arms(cfg: StudyConfig) -> list[tuple[str, dict[str, Any] | None]]:
    """(name, overrides) per arm; with a sweep, every pretrained arm once per value."""
    arms = []
    sweep = cfg.study.sweep
    for arm in cfg.study.arms:
        over = parse_arm(arm)
        if sweep and over is not None:
            (key, values), = sweep.items()
            arms += [(f"{arm}[{key}={v}]", {**over, key: v}) for v in values]
        else:
            arms.append((arm, over))
    return arms


def with_overrides(base: dict, overrides: dict[str, Any]) -> dict:
    tree = copy.deepcopy(base)
    for k, v in overrides.items():
        set_dotted(tree, k, v)
    return tree


def existing(paths: list[str]) -> list[str]:
    return [p for p in paths if Path(p).exists()]


def finetune_config(cfg: StudyConfig, run_dir: Path | str, seed: int, labels: int | None = None) -> FinetuneConfig:
    """The finetuning config of one arm: the shared ``finetune:`` section plus the study's named data; ``labels``
    limits training to the first N cases (``data.limit_train``)."""
    st = cfg.study
    over = {"run_dir": str(run_dir), "seed": seed, "data.train": st.finetune_train.data,
            "data.train_split": st.finetune_train.split, "finetune.select": st.select}
    if labels is not None:
        over["data.limit_train"] = labels
    tree = with_overrides(cfg.finetune, over)
    for key in ("val", "val_split", "holdout"):
        tree.setdefault("data", {}).pop(key, None)  # the study names the validation set, nothing else does
    if st.finetune_val is not None and st.finetune_val.holdout:
        tree["data"]["holdout"] = st.finetune_val.holdout
    elif st.finetune_val is not None:
        tree["data"].update(val=st.finetune_val.data, val_split=st.finetune_val.split)
    return load_config(None, [], FinetuneConfig, base=tree)
