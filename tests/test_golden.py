"""The losses of two tiny pinned runs (the study's CNN with SubFore masks, and MAE on a tiny UNETR) against
docs/study/golden.json: a change that moves them moves every number docs/study.md quotes.

When this fails on purpose: rerun the studies docs/study.md names with the new code, regenerate docs/study.md and
docs/study*/ from them, then refresh the golden file in the same change:
``SUBFORE_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from subfore.config import load_config
from subfore.pretrain import pretrain

GOLDEN = Path(__file__).resolve().parents[1] / "docs" / "study" / "golden.json"
# Float reductions may differ in the last bits between CPUs; a change in what is computed moves losses far more.
RTOL = 1e-4

RUNS = {
    "basicunet_foreground": {"model": {"name": "basicunet", "feature_size": 4},
                             "masking": {"strategy": "foreground", "ratio": 0.6, "subvolume_size": 16}},
    "unetr_mae": {"model": {"name": "unetr", "feature_size": 4, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4,
                            "encoding": "visible"},
                  "decoder": {"width": 48, "depth": 1, "heads": 4},
                  "masking": {"strategy": "random", "ratio": 0.75, "subvolume_size": 16, "loss": "mse",
                              "norm_pix_loss": True}},
}


def losses(phantom_dir: Path, run_dir: Path, sections: dict) -> list[float]:
    tree = {"run_dir": str(run_dir), "seed": 0,
            "data": {"train": str(phantom_dir / "dataset.json"), "roi": [32, 32, 32], "cache_dir": None,
                     "num_workers": 0},
            "optim": {"warmup_steps": 1},
            # accelerator cpu: the golden losses are fp32 CPU numbers, also on a machine that has a GPU
            "train": {"max_steps": 3, "batch_size": 2, "ckpt_every": 3, "log_every": 1, "progress_bar": False,
                      "accelerator": "cpu"},
            **sections}
    pretrain(load_config(None, [], base=tree))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_pinned_tiny_runs_give_the_golden_losses(phantom_dir, tmp_path):
    got = {name: losses(phantom_dir, tmp_path / name, sections) for name, sections in RUNS.items()}
    if os.environ.get("SUBFORE_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"about": __doc__.split("\n\n")[0].replace("\n", " "), "losses": got},
                                     indent=1) + "\n")
        pytest.skip(f"rewrote {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert set(got) == set(golden)
    for name, values in got.items():
        assert len(values) == 3, name
        assert values == pytest.approx(golden[name], rel=RTOL), (
            f"{name}: losses {values} moved from {golden[name]}; see this test's docstring for what to regenerate")
