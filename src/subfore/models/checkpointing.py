"""Gradient checkpointing (``model.checkpointing``) of chosen submodules, in place: each keeps its class, its place
in the network and its parameters, so state_dict keys and values are those of the unchanged network.

    >>> checkpoint_modules([net.conv_0, net.down_1])   # their activations are recomputed in backward

A checkpointed module's inner activations are freed after its forward and recomputed (once more through the
module's own ``forward``) while gradients flow back through it: less memory for one more forward of that module.
Only in training with grad enabled; in eval or under ``torch.no_grad`` (validation, the EMA teacher) it runs as
before. A ``copy.deepcopy`` of the network (the EMA teacher) is checkpointed the same way, on its own modules.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError


class CheckpointedForward:
    """A module's forward that runs under ``torch.utils.checkpoint`` (non-reentrant) in training with grad on.

    Set as the instance's ``forward`` (not a parent module, so no key changes); ``nn.Module.__call__`` and its hooks
    are untouched, and the recomputation calls the class's ``forward`` directly.
    """

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args, **kwargs):
        module = self.module
        forward = type(module).forward
        if module.training and torch.is_grad_enabled():
            return checkpoint(forward, module, *args, use_reentrant=False, **kwargs)
        return forward(module, *args, **kwargs)

    def __reduce__(self):
        # copy.deepcopy/pickle rebuild it around the copied module (the memo maps the module to its copy).
        return CheckpointedForward, (self.module,)


def is_checkpointed(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), CheckpointedForward)


def checkpoint_modules(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """Checkpoint each module's forward (idempotent); returns them.

    Refuses modules with running-statistics BatchNorm: the recomputation would update those statistics twice.
    """
    modules = list(modules)
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.track_running_stats:
                raise ConfigError(
                    f"model.checkpointing: the network's {type(sub).__name__} layers keep running statistics, which "
                    f"recomputation would update twice per step; use instance or group norm, or "
                    f"model.checkpointing: false")
    for module in modules:
        if not is_checkpointed(module):
            module.forward = CheckpointedForward(module)
    return modules
