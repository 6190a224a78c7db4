"""``train.compile`` on CPU: a training step's time compiled (inductor) vs eager, and the time the compile took.

For each backbone, two copies of the same network (same weights) train on the same random crops, back to back in
this process: eager, then compiled in place as ``subfore pretrain --set train.compile=true`` compiles it
(:func:`subfore.engine.compile.compile_network`). A step: forward, L1 loss, backward, AdamW. Compile time: the
compiled network's first steps (until torch._dynamo compiles no new graph) less that many warm steps. Inductor's
cache starts empty (a fresh TORCHINDUCTOR_CACHE_DIR): the compile time a first run pays.

    python benchmarks/compile.py                       # basicunet fs 8 and a small unetr, 32³, batch 2
    python benchmarks/compile.py --steps 20 --roi 64
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="subfore-inductor-"))

import torch  # noqa: E402

MODELS = {
    "basicunet fs 8": {"name": "basicunet", "feature_size": 8},
    "unetr hidden 96, 4 heads": {"name": "unetr", "feature_size": 8, "hidden_size": 96, "mlp_dim": 192,
                                 "num_heads": 4},
}


def build(model: dict, roi: int) -> torch.nn.Module:
    from subfore.config import load_config
    from subfore.models.registry import resolve_backbone

    cfg = load_config(None, [], base={"run_dir": "/tmp/unused", "data": {"train": "unused", "roi": [roi] * 3},
                                      "model": model})
    return resolve_backbone(cfg.model).build(1, 1, (roi,) * 3)


def step_times(net: torch.nn.Module, crops: list[torch.Tensor]) -> tuple[list[float], list[int]]:
    """Seconds per training step over ``crops`` and torch._dynamo's graph count after each."""
    from torch._dynamo.utils import counters

    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    times, graphs = [], []
    for x in crops:
        t = time.perf_counter()
        (net(x) - x).abs().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        graphs.append(counters["stats"]["unique_graphs"])
    return times, graphs


def main() -> None:
    from torch._dynamo.utils import counters

    from subfore.engine.compile import compile_network

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--roi", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed warm steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="eager warm-up steps (compiled: until nothing compiles)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
          f"threads; roi {args.roi}³, batch {args.batch}, {args.steps} timed steps")
    print("| backbone | eager s/step | compiled s/step | compiled / eager | compile s | graphs |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for label, model in MODELS.items():
        counters.clear()
        torch.manual_seed(0)
        eager = build(model, args.roi)
        compiled = build(model, args.roi)
        compiled.load_state_dict(eager.state_dict())
        compile_network(compiled, True)
        crops = [torch.randn(args.batch, 1, *(args.roi,) * 3, generator=g) for _ in range(args.warmup + args.steps)]
        e_times, _ = step_times(eager, crops)
        e = statistics.median(e_times[args.warmup:])
        c_times, graphs = step_times(compiled, crops + crops[: args.warmup])
        # The compile phase: the steps up to the last that compiled a new graph.
        last = graphs.index(graphs[-1]) + 1
        warm = c_times[last:][: args.steps]
        c = statistics.median(warm)
        print(f"| {label} | {e:.3f} | {c:.3f} | {c / e:.2f} | {sum(c_times[:last]) - last * c:.0f} | "
              f"{graphs[-1]} |", flush=True)
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
