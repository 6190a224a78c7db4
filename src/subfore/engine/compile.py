"""``train.compile``: torch.compile a run's network in place, so that its state_dict keys stay as they are."""

from __future__ import annotations

from torch import nn

#: torch.compile's backend; inductor generates fused kernels (C++ on CPU, Triton on CUDA). Another backend
#: (``aot_eager``: traced but not code-generated) is for tests, where inductor's first build takes minutes on a CPU.
BACKEND = "inductor"


def compile_network(net: nn.Module, enabled: bool) -> nn.Module:
    """Compile ``net`` with torch.compile when ``enabled``; return it (the same object).

    In place (:meth:`torch.nn.Module.compile`): parameters, ``state_dict`` keys (no ``_orig_mod.`` prefix),
    checkpoints, exports and resume are those of the eager network. The first steps compile (minutes on a CPU);
    shapes that change (a last smaller batch, validation windows) compile once more, with the size dynamic.
    """
    if enabled:
        net.compile(backend=BACKEND)
    return net
