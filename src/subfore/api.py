"""The public Python API: the functions the ``subfore`` command line calls, one import away.

    >>> from subfore.api import FinetuneConfig, evaluate, finetune, load_config, pretrain
    >>> encoder = pretrain(load_config("configs/pretrain/demo_cpu.yaml", ["train.max_steps=20"]))
    >>> best = finetune(load_config("configs/finetune/demo_cpu.yaml", [], FinetuneConfig), pretrained=encoder)
    >>> evaluate(best, "data/phantoms/dataset.json", "runs/metrics.json")

Each function raises :class:`subfore.errors.SubforeError` (one line naming the file and the problem) on bad input,
and :class:`subfore.preempt.Preempted` when SIGTERM/SIGUSR1 stopped a training run after saving its checkpoint.
docs/api.md walks through a whole pretrain → finetune → evaluate script. Masking lives in :mod:`subfore.masking`.
"""

from __future__ import annotations

from .config import FinetuneConfig, PretrainConfig, ProbeSettings, load_config
from .evaluate import evaluate, evaluate_predictions
from .finetune import finetune
from .fingerprint import fingerprint
from .inference import predict
from .models.artifact import EncoderMeta, read_encoder, read_weights
from .models.hub import export_hub
from .models.nnunet.export import export_nnssl, export_nnunet
from .pretrain import pretrain
from .probe import probe_encoder as probe
from .study import StudyConfig, study

__all__ = ["EncoderMeta", "FinetuneConfig", "PretrainConfig", "ProbeSettings", "StudyConfig", "evaluate",
           "evaluate_predictions", "export_hub", "export_nnssl", "export_nnunet", "finetune", "fingerprint", "load_config", "predict",
           "pretrain", "probe", "read_encoder", "read_weights", "study"]
