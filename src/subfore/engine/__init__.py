"""What every training run shares: step-indexed data (``sampling``), rank-agreed optimiser steps (``module``),
and the run around the loop: preemption, the final checkpoint, metrics.jsonl, resume, the Trainer (``run``)."""

from ..preempt import PREEMPT_SIGNALS, STOP, Preempted, StopRequest
from .module import RunModule, gather_scalars, module_digest, reduce_sum, tensor_digest, warmup_cosine
from .run import (
    MetricsWriter,
    RunControl,
    device_for,
    make_trainer,
    autocast_of,
    inference_precision,
    resolve_precision,
    resolve_resume,
)
from .sampling import DrawDataset, StepSampler, check_fill, make_loaders, mix_seed, shard, train_loader

__all__ = [
    "DrawDataset", "MetricsWriter", "PREEMPT_SIGNALS", "Preempted", "RunControl", "RunModule", "STOP", "StepSampler",
    "StopRequest", "check_fill", "device_for", "gather_scalars", "autocast_of", "inference_precision", "make_loaders", "make_trainer", "mix_seed",
    "module_digest", "reduce_sum", "resolve_precision", "resolve_resume", "shard", "tensor_digest", "train_loader",
    "warmup_cosine",
]
