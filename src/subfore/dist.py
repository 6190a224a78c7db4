"""The launch layout (torchrun, SLURM) read from the environment, before any process group exists.

Imports no Lightning or torch: the data layer uses it to let one rank prepare shared files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from .errors import SubforeError


def launched_layout() -> tuple[int, int] | None:
    """(processes per node, nodes) when torchrun or SLURM's srun started several processes, else None."""
    env = os.environ
    world, local = env.get("WORLD_SIZE", ""), env.get("LOCAL_WORLD_SIZE", "")
    if world.isdigit() and local.isdigit() and int(world) > 1:
        return int(local), max(1, int(world) // int(local))
    tasks, nodes = env.get("SLURM_NTASKS", ""), env.get("SLURM_NNODES", "")
    if slurm_job() and tasks.isdigit() and nodes.isdigit() and int(tasks) > 1:
        return max(1, int(tasks) // int(nodes)), int(nodes)
    return None


def slurm_job() -> bool:
    """Whether this process is a task of a SLURM job step (Lightning's SLURMEnvironment.detect rule)."""
    env = os.environ
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def launch_rank() -> int:
    """This process's global rank as the launcher (torchrun, SLURM) set it, before any process group exists."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def first_rank_prepares(ready: Path, prepare: Callable[[], None], timeout_s: float = 3600.0) -> None:
    """Rank 0 runs ``prepare`` unless ``ready`` exists; other ranks wait for ``ready`` to appear."""
    if ready.exists():
        return
    if launch_rank() == 0:
        prepare()
        return
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if time.monotonic() > deadline:
            raise SubforeError(f"{ready}: rank 0 did not write it within {timeout_s:.0f} s")
        time.sleep(1.0)
