"""Pieces the pretraining benchmarks share: synthetic crops, the plain PyTorch loop, the engine's clock, peaks.

Imported by ``pretrain_throughput.py`` and ``gpu_check.py`` (run as scripts, so this folder is on ``sys.path``).
Nothing here downloads anything: the crops are synthetic.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch


def phantom_crops(n: int, roi: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` phantom-like crops (1, roi, roi, roi) in [0, 1]: a body ellipse of soft tissue (0.5) in air (0) plus
    N(0, 0.05) noise, so that foreground masking has background to leave alone."""
    g = torch.Generator().manual_seed(seed)
    zz, yy, xx = torch.meshgrid(*(torch.linspace(-1, 1, roi),) * 3, indexing="ij")
    body = ((xx / 0.8) ** 2 + (yy / 0.6) ** 2 <= 1).float()
    return [torch.clamp(0.5 * body + 0.05 * torch.randn(1, roi, roi, roi, generator=g), 0, 1) for _ in range(n)]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak(device: torch.device) -> dict:
    """Peak memory so far: CUDA max allocated on a GPU, else the process's max RSS (ru_maxrss, never reset)."""
    if device.type == "cuda":
        return {"peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20, "mem_kind": "CUDA max allocated"}
    return {"peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "mem_kind": "max RSS"}


def reset_peak(device: torch.device) -> None:
    """Free what an earlier measurement left, then restart the peak count: CUDA's peak statistics, or on Linux
    the process's VmHWM (read back by :func:`peak_since_reset`)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
    restart_peak(device)


def restart_peak(device: torch.device) -> float:
    """The peak (MB) since the last reset; then the count restarts from the memory in use now (nothing freed)."""
    before = peak_since_reset(device)["peak_mem_mb"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts at the current RSS
        except OSError:
            pass
    return before


def peak_since_reset(device: torch.device) -> dict:
    """Peak memory since :func:`reset_peak`: CUDA max allocated (MB), or the process's VmHWM (MB) on CPU."""
    if device.type == "cuda":
        return peak(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return {"peak_mem_mb": int(line.split()[1]) / 1024, "mem_kind": "peak RSS (VmHWM)"}
    except OSError:
        pass
    return peak(device)


class StepCounter:
    """Counts optimiser steps actually taken in this process (every optimiser's ``step``), from ``start()`` on.

    A step skipped for a non-finite loss, or a loop that never reached the optimiser, does not count.
    """

    def __init__(self) -> None:
        self.total = 0
        self.mark = None
        self._depth = 0
        self._handles = []

    def __enter__(self) -> "StepCounter":
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._handles = [register_optimizer_step_pre_hook(self._enter), register_optimizer_step_post_hook(self._leave)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def _enter(self, optimizer, args, kwargs) -> None:
        self._depth += 1

    def _leave(self, optimizer, args, kwargs) -> None:
        # An optimiser subclass whose step calls its parent's runs the hooks at both levels: count the outer one.
        self._depth -= 1
        if self._depth == 0:
            self.total += 1

    def start(self) -> None:
        """The timed steps start here."""
        self.mark = self.total

    @property
    def since_start(self) -> int:
        return 0 if self.mark is None else self.total - self.mark


def plain_step_fn(net, masker, visible: bool, patches_per_subvolume: int = 1):
    """One masked reconstruction as a hand-written loop does it: x (B, C, D, H, W) → the masked L1 loss (fp32).

    Dense (SimMIM): the masked subvolumes filled with N(0, 1), the whole crop through ``net``. Visible (MAE):
    ``net(x, patch_mask)`` encodes the visible 16³ patches only and reconstructs every voxel.
    """
    from subfore.masking import apply_mask, masked_l1

    if visible:
        from subfore.models.mae import patch_grid

        def step(x, gen):
            mask = masker(x, generator=gen)
            pred = net(x, patch_grid(mask, patches_per_subvolume))[0]
            return masked_l1(pred.float(), x, mask)
    else:
        def step(x, gen):
            mask = masker(x, generator=gen)
            pred = net(apply_mask(x, mask, "noise", generator=gen))
            return masked_l1(pred.float(), x, mask)
    return step


def plain_loop(cfg, data: list[torch.Tensor], warmup: int, steps: int, device: torch.device, *,
               precision: str = "32", compile: bool = False, time_masks: bool = False,
               peak_of_timed: bool = False) -> dict:
    """A hand-written training loop over the network, masks and crops ``subfore pretrain`` would use: the minimum
    the engine's step has to do (forward, masked L1, backward, grad-norm clip, AdamW, LR schedule).

    cfg: a PretrainConfig (the network and masker are built from it, so ``model.checkpointing`` applies as in a
    run); data: ``batch · (warmup + steps)`` crops (1, D, H, W); precision: Lightning's name ('bf16-mixed': bf16
    autocast); compile: ``torch.compile`` the network, as the anchor would; peak_of_timed: restart the peak count
    when the timed steps start (:func:`restart_peak`; ``peak_warmup_mb``: the peak before). Returns samples/s,
    s/step and the optimiser steps taken (``steps_timed`` of them after the warm-up).
    """
    from subfore.masking import apply_mask
    from subfore.pretrain import MaskedImageModel, warmup_cosine

    module = MaskedImageModel(cfg).to(device).train()
    net, masker = module.net, module.masker
    o = cfg.optim
    opt = torch.optim.AdamW(net.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, o.warmup_steps, cfg.train.max_steps))
    step_net = net
    if compile:
        from torch._dynamo.eval_frame import OptimizedModule

        if not isinstance(net, OptimizedModule):  # one the config's own wiring compiled is used as it is
            step_net = torch.compile(net)
    loss_of = plain_step_fn(step_net, masker, module.visible, getattr(module, "patches_per_subvolume", 1))
    gen = torch.Generator(device=device).manual_seed(0)
    amp = precision.startswith("bf16")
    clip = cfg.train.grad_clip
    batch = cfg.train.batch_size
    t0 = None
    warm_peak = None
    with StepCounter() as counter:
        for i in range(warmup + steps):
            if i == warmup:
                sync(device)
                if peak_of_timed:
                    warm_peak = restart_peak(device)
                t0 = time.perf_counter()
                counter.start()
            x = torch.stack(data[i * batch : (i + 1) * batch]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_of(x, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            sched.step()
        sync(device)
        elapsed = time.perf_counter() - t0
    out = {"samples_per_s": steps * batch / elapsed, "step_s": elapsed / steps, "steps_timed": counter.since_start,
           "steps_total": counter.total, "loss": float(loss.detach()), "peak_warmup_mb": warm_peak}
    if time_masks:  # the mask path alone on the same batches
        sync(device)
        t1 = time.perf_counter()
        for i in range(steps):
            x = torch.stack(data[i * batch : (i + 1) * batch]).to(device)
            apply_mask(x, masker(x, generator=gen), "noise", generator=gen)
        sync(device)
        out["mask_s"] = (time.perf_counter() - t1) / steps
    return out


def engine_clock(warmup: int, device: torch.device, counter: StepCounter | None = None, peak_of_timed: bool = False):
    """A Lightning callback timing the optimiser steps after ``warmup`` ones, to the end of training
    (``.elapsed`` seconds); it starts ``counter`` with the clock (and restarts the peak count: ``peak_of_timed``,
    the peak before in ``.warm_peak``)."""
    from lightning.pytorch.callbacks import Callback

    class Clock(Callback):
        t0 = None
        elapsed = None
        warm_peak = None

        def on_train_batch_start(self, trainer, module, batch, i):
            if trainer.global_step == warmup and self.t0 is None:
                sync(device)
                if peak_of_timed:
                    self.warm_peak = restart_peak(device)
                self.t0 = time.perf_counter()
                if counter is not None:
                    counter.start()

        def on_train_end(self, trainer, module):
            sync(device)
            self.elapsed = time.perf_counter() - self.t0

    return Clock()


def engine_fit(module, data: list[torch.Tensor], batch: int, warmup: int, steps: int, device: torch.device,
               make_trainer, peak_of_timed: bool = False) -> dict:
    """Train ``module`` (a MaskedImageModel) with the Trainer ``make_trainer(callbacks)`` builds for
    ``warmup + steps`` optimiser steps over ``data`` (the same crops, in order, as :func:`plain_loop`)."""
    loader = torch.utils.data.DataLoader([{"image": c} for c in data], batch_size=batch, shuffle=False)
    with StepCounter() as counter:
        clock = engine_clock(warmup, device, counter, peak_of_timed)
        trainer = make_trainer([clock])
        trainer.fit(module, loader)
    return {"samples_per_s": steps * batch / clock.elapsed, "step_s": clock.elapsed / steps,
            "steps_timed": counter.since_start, "steps_total": counter.total, "global_step": trainer.global_step,
            "peak_warmup_mb": clock.warm_peak}
