"""Teacher-guided masking: AnatoMask (teacher reconstruction error) and hard-patch mining (predicted loss).

Both compose the mask the same way (``compose_mask``): of the k = round(ρ·n) masked subvolumes,
⌈r_t·k⌉ are the teacher's highest-scoring candidates and the rest are drawn uniformly from the other
candidates, with r_t rising easy-to-hard from r_0 to r_T over training. The teacher itself (an EMA of
the student) lives in the training module, which sets ``scorer``, ``step`` and ``total_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .base import MaskGenerator, register
from .foreground import parse_threshold
from .grid import Threshold, Window, exact_count, foreground_grid, select_lowest, uniform_noise

Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Generator | None], torch.Tensor]


def hard_share(step: int, total: int, r0: float = 0.0, rT: float = 0.5, order: str = "easy-to-hard") -> float:
    """r_t = r_0 + (t / T)·(r_T − r_0), with r_0 and r_T swapped for ``hard-to-easy``; t is clamped to [0, T]."""
    if order == "hard-to-easy":
        r0, rT = rT, r0
    elif order != "easy-to-hard":
        raise ValueError(f"schedule must be 'easy-to-hard' or 'hard-to-easy', got {order!r}")
    t = min(max(step, 0), total) / max(total, 1)
    return r0 + t * (rT - r0)


def compose_mask(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    ratio: float,
    r_t: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask k = round(ρ·n_candidates) cells per sample: the ⌈r_t·k⌉ top-scoring, the rest uniformly at random.

    scores: (B, nz, ny, nx) float, higher = harder; ``-inf`` for cells the teacher did not score.
    candidates: (B, nz, ny, nx) bool, the cells that may be masked.
    Returns (mask, hard) BoolTensors of the grid's shape; ``hard`` marks the teacher-chosen cells.
    """
    b = scores.shape[0]
    cand = candidates.reshape(b, -1)
    s = scores.reshape(b, -1).float()
    k = exact_count(cand.sum(1), ratio)
    # A tiny epsilon keeps ⌈0.5·6⌉ = 3 when 0.5·6 lands a hair above 3 in floating point.
    h = torch.ceil(k.double() * r_t - 1e-9).long().clamp(min=0)
    h = torch.minimum(h, k)
    scorable = cand & torch.isfinite(s)
    hard = select_lowest((-s).masked_fill(~scorable, float("inf")), h)
    rest = uniform_noise(tuple(cand.shape), scores.device, generator).masked_fill(~cand | hard, float("inf"))
    chosen = hard | select_lowest(rest, k - hard.sum(1))
    return chosen.view(scores.shape), hard.view(scores.shape)


class TeacherGuidedMask(MaskGenerator):
    """Base for generators whose hard share comes from a teacher's per-subvolume score.

    gate: ``None`` (every subvolume is a candidate) or ``"foreground"`` (only subvolumes with mean ≥ λ;
    ρ applies to them, and a sample without foreground falls back to all subvolumes, counted).
    Without a ``scorer`` (e.g. in show-mask) scores are random and the mask is plain random masking.
    """

    def __init__(
        self,
        ratio: float = 0.6,
        size: int = 16,
        gate: str | None = None,
        threshold: Threshold | None = 0.1,
        threshold_hu: float | None = None,
        window: Window | None = None,
        r0: float = 0.0,
        rT: float = 0.5,
        schedule: str = "easy-to-hard",
    ) -> None:
        super().__init__(ratio, size)
        if gate not in (None, "foreground"):
            raise ValueError(f"gate must be None or 'foreground', got {gate!r}")
        if not (0 <= r0 <= 1 and 0 <= rT <= 1):
            raise ValueError(f"r0 and rT must lie in [0, 1], got {r0}, {rT}")
        hard_share(0, 1, r0, rT, schedule)  # validates the schedule name
        self.gate = gate
        self.threshold = parse_threshold(threshold, threshold_hu, window)
        self.r0, self.rT, self.schedule = r0, rT, schedule
        self.scorer: Scorer | None = None
        self.step, self.total_steps = 0, 1

    @property
    def r_t(self) -> float:
        return hard_share(self.step, self.total_steps, self.r0, self.rT, self.schedule)

    def candidates(self, x: torch.Tensor, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidates, foreground) grids; candidates fall back to all cells for a sample without foreground."""
        fg = foreground_grid(self.foreground_source(x), self.size, self.threshold)
        if not self.gate:
            return torch.ones_like(fg), fg
        empty = ~fg.flatten(1).any(1)
        return fg | empty.view(-1, 1, 1, 1), fg

    def build(self, x, grid, generator):
        cand, fg = self.candidates(x, grid)
        if self.scorer is None:
            scores = uniform_noise(tuple(cand.shape), x.device, generator)
        else:
            scores = self.scorer(x, cand, generator)
        mask, hard = compose_mask(scores, cand, self.ratio, self.r_t, generator)
        n_hard = hard.sum()
        self.last_stats = {
            "r_t": torch.tensor(self.r_t),
            "teacher_fg_share": (hard & fg).sum() / n_hard.clamp_min(1),
            "foreground_fraction": fg.float().mean(),
        }
        if self.gate:
            self.last_stats["fallbacks"] = (~fg.flatten(1).any(1)).sum()
        return mask


@register("anatomask")
class AnatoMask(TeacherGuidedMask):
    """AnatoMask: the EMA teacher reconstructs under a random ρ mask; its per-subvolume L1 error is the score."""

    teacher_kind = "reconstruction"


@register("hpm")
class HardPatchMask(TeacherGuidedMask):
    """Hard-patch mining: the EMA teacher's loss predictor scores every subvolume of the unmasked input."""

    teacher_kind = "predictor"


def ema_momentum(step: int, total: int, start: float = 0.999, end: float = 0.9999, ramp: str = "linear",
                 ramp_fraction: float = 0.25) -> float:
    """EMA momentum rising from ``start`` at step 0 to ``end`` at ``ramp_fraction · total``, then held.

    The defaults are AnatoMask's published schedule (0.999 → 0.9999, linear, over the first quarter of training);
    ``cosine`` rises slower at first.
    """
    ramp_steps = max(ramp_fraction * total, 1e-12)
    t = min(max(step, 0) / ramp_steps, 1.0)
    if ramp == "cosine":
        return end - (end - start) * (math.cos(math.pi * t) + 1) / 2
    if ramp == "linear":
        return start + (end - start) * t
    raise ValueError(f"EMA ramp must be 'cosine' or 'linear', got {ramp!r}")


def ranking_loss(
    pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor, max_pairs: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """HPM's relative objective: BCE on whether subvolume j's true loss exceeds i's, logit = pred_j − pred_i.

    pred, true: (B, N) per-subvolume predicted and (detached) true losses; mask: (B, N) bool, pairs are
    drawn among masked cells, ``max_pairs`` per sample with replacement. Returns a scalar (0 if no pair).
    """
    b, n = mask.shape
    weights = mask.float() + (~mask.any(1, keepdim=True)).float()  # rows without a masked cell: any cell
    i = torch.multinomial(weights, max_pairs, replacement=True, generator=generator)
    j = torch.multinomial(weights, max_pairs, replacement=True, generator=generator)
    ti, tj = true.gather(1, i), true.gather(1, j)
    valid = mask.gather(1, i) & mask.gather(1, j) & (ti != tj)
    logits = pred.gather(1, j) - pred.gather(1, i)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, (tj > ti).float(), reduction="none")
    return (bce * valid).sum() / valid.sum().clamp_min(1)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of two 1-D tensors (ties broken by order)."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12)
