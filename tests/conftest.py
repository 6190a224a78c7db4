"""Shared fixtures: small phantoms written once per session, and the path to ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
REAL_CT = SHARED / "ct" / "ts_abdomen_small_ct.nii.gz"
REAL_SEG = SHARED / "ct" / "ts_abdomen_small_seg.nii.gz"

needs_real_ct = pytest.mark.skipif(not REAL_CT.exists(), reason=f"real CT not found at {REAL_CT} (../shared/data absent)")


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Four coarse phantoms (2×2×3 mm) with a decathlon dataset.json (3 training, 1 validation)."""
    from subfore.phantoms import PhantomSpec, write_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    write_phantoms(out, n=4, seed=0, spec=PhantomSpec(spacing=(2.0, 2.0, 3.0)))
    return out
