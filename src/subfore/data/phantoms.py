"""Synthetic abdominal CT phantoms in HU with BTCV organ labels: the built-in default data.

Geometry is defined in millimetres in RAS world space (+x patient right, +y anterior, +z superior),
so a phantom looks the same at any spacing. Organ shapes, sizes and positions vary with the seed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..dist import first_rank_prepares
from ..io import write_json

# BTCV organ ids (1…13 order: spleen, rkid, lkid, gall, eso, liver, sto, aorta, IVC, veins, pancreas, rag, lag).
LABELS = {
    "spleen": 1,
    "right_kidney": 2,
    "left_kidney": 3,
    "gallbladder": 4,
    "liver": 6,
    "stomach": 7,
    "aorta": 8,
    "inferior_vena_cava": 9,
    "pancreas": 11,
}
BTCV_NAMES = {
    0: "background", 1: "spleen", 2: "right_kidney", 3: "left_kidney", 4: "gallbladder", 5: "esophagus",
    6: "liver", 7: "stomach", 8: "aorta", 9: "inferior_vena_cava", 10: "portal_splenic_veins",
    11: "pancreas", 12: "right_adrenal_gland", 13: "left_adrenal_gland",
}
# Mean HU per tissue (portal-venous contrast phase) and the voxel noise.
HU = {
    "air": -1000, "lung": -850, "fat": -100, "muscle": 50, "bone_cortical": 750, "bone_trabecular": 250,
    "liver": 110, "spleen": 120, "kidney": 170, "aorta": 190, "ivc": 140, "stomach_wall": 60,
    "stomach_content": 15, "pancreas": 95, "gallbladder": 10, "bowel": 35,
}
NOISE_HU = 12.0


@dataclass
class PhantomSpec:
    """Grid of a phantom: voxel spacing (mm) and field of view (mm), in RAS axis order."""

    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5)
    fov: tuple[float, float, float] = (360.0, 280.0, 160.0)
    orientation: str = "RAS"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(round(f / s)) for f, s in zip(self.fov, self.spacing))  # type: ignore[return-value]


class _Body:
    """Paints tissues by priority into HU and label volumes on a RAS world grid."""

    def __init__(self, spec: PhantomSpec, rng: np.random.Generator) -> None:
        self.rng = rng
        axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(spec.shape, spec.spacing)]
        self.x, self.y, self.z = np.meshgrid(*[a.astype(np.float32) for a in axes], indexing="ij", sparse=True)
        self.hu = np.full(spec.shape, HU["air"], dtype=np.float32)
        self.label = np.zeros(spec.shape, dtype=np.uint8)
        self.z_top = float(axes[2][-1])

    def jitter(self, value: float, rel: float = 0.12) -> float:
        return float(value * (1 + self.rng.uniform(-rel, rel)))

    def shift(self, value: float, mm: float = 8.0) -> float:
        return float(value + self.rng.uniform(-mm, mm))

    def ellipsoid(self, c, r, angle_deg: float = 0.0) -> np.ndarray:
        """Boolean ellipsoid, rotated by ``angle_deg`` about z."""
        a = np.deg2rad(angle_deg)
        dx, dy, dz = self.x - c[0], self.y - c[1], self.z - c[2]
        u = dx * np.cos(a) + dy * np.sin(a)
        v = -dx * np.sin(a) + dy * np.cos(a)
        return (u / r[0]) ** 2 + (v / r[1]) ** 2 + (dz / r[2]) ** 2 <= 1.0

    def cylinder(self, c, r) -> np.ndarray:
        """An elliptic cylinder along z (through the whole volume), ``c`` = (x, y)."""
        return ((self.x - c[0]) / r[0]) ** 2 + ((self.y - c[1]) / r[1]) ** 2 + 0 * self.z <= 1.0

    def paint(self, region: np.ndarray, tissue: str, label: int | None = None) -> None:
        region = np.broadcast_to(region, self.hu.shape)
        self.hu[region] = HU[tissue] + self.rng.normal(0, 6)
        if label is not None:
            self.label[region] = label


def make_phantom(seed: int = 0, spec: PhantomSpec | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One abdominal CT phantom: (HU int16 volume, uint8 BTCV labels, 4×4 affine), RAS or LPS per ``spec``."""
    spec = spec or PhantomSpec()
    rng = np.random.default_rng(seed)
    b = _Body(spec, rng)
    j, s = b.jitter, b.shift
    scale = rng.uniform(0.9, 1.08)
    ax, ay = 150 * scale, 110 * scale
    zt = b.z_top

    # Body wall: skin-line ellipse of fat, a muscle ring inside it, then the abdominal cavity.
    fat_t, mus_t = rng.uniform(12, 28), rng.uniform(8, 14)
    b.paint(b.cylinder((0, 0), (ax, ay)), "fat")
    b.paint(b.cylinder((0, 0), (ax - fat_t, ay - fat_t)), "muscle")
    cavity = b.cylinder((0, 0), (ax - fat_t - mus_t, ay - fat_t - mus_t))
    b.paint(cavity, "fat")
    # Bowel: a smooth random field thresholded inside the cavity, with a few gas bubbles.
    field = ndimage.gaussian_filter(rng.normal(size=spec.shape).astype(np.float32), sigma=[12 / sp for sp in spec.spacing])
    field /= field.std() + 1e-6
    b.paint(cavity & (field > 0.2), "bowel")
    b.paint(cavity & (field > 2.3), "air")

    # Spine: vertebral body (cortical rim, trabecular core), spinous process, paraspinal muscles.
    vy = -ay + fat_t + 40
    b.paint(b.ellipsoid((25, vy - 15, 0), (22, 25, 1e4)), "muscle")
    b.paint(b.ellipsoid((-25, vy - 15, 0), (22, 25, 1e4)), "muscle")
    b.paint(b.cylinder((0, vy), (20, 17)), "bone_cortical")
    b.paint(b.cylinder((0, vy), (17, 14)), "bone_trabecular")
    b.paint(b.cylinder((0, vy - 30), (4, 12)), "bone_cortical")
    # Ribs: thin arcs every ~25 mm in the upper half, inside the muscle wall.
    r_out = np.sqrt((b.x / (ax - fat_t)) ** 2 + (b.y / (ay - fat_t)) ** 2)
    rib_z = np.abs(((b.z - rng.uniform(0, 25)) % 25) - 12.5) < 4
    b.paint((r_out > 0.86) & (r_out < 0.93) & rib_z & (b.z > -10) & (b.y < ay * 0.5), "bone_cortical")

    # Lung bases: only the lowest part of each lung reaches into the top of the field.
    for side in (1, -1):
        b.paint(b.ellipsoid((side * 70, s(-20), zt + s(10, 10)), (j(55), j(65), j(60))) & cavity, "lung")

    aorta_c = (s(-15, 4), vy + 32)
    ivc_c = (s(25, 4), vy + 34)
    organs = {
        "liver": (
            b.ellipsoid((s(65), s(5), s(35)), (j(75), j(80), j(75)), angle_deg=s(10, 10))
            & (0.8 * b.x - 0.35 * b.y > s(-25, 10))
        ),
        "spleen": b.ellipsoid((s(-85), s(-35), s(35)), (j(25), j(45), j(45)), angle_deg=s(35, 15)),
        "right_kidney": b.ellipsoid((s(60, 5), vy + s(10, 5), s(-20)), (j(25), j(20), j(50)), angle_deg=s(-25, 10)),
        "left_kidney": b.ellipsoid((s(-60, 5), vy + s(12, 5), s(-10)), (j(25), j(20), j(50)), angle_deg=s(25, 10)),
        "aorta": b.cylinder(aorta_c, (j(12), j(12))),
        "inferior_vena_cava": b.cylinder(ivc_c, (j(12), j(9))),
    }
    tissue = {"liver": "liver", "spleen": "spleen", "right_kidney": "kidney", "left_kidney": "kidney",
              "aorta": "aorta", "inferior_vena_cava": "ivc"}
    for name, region in organs.items():
        b.paint(region & cavity, tissue[name], LABELS[name])

    # Stomach: wall, fluid content and an anterior-superior air pocket; labelled as a whole.
    sc, sr = (s(-45), s(30), s(35)), (j(40), j(30), j(45))
    stomach = b.ellipsoid(sc, sr, angle_deg=s(-20, 10)) & cavity
    b.paint(stomach, "stomach_wall", LABELS["stomach"])
    inner = b.ellipsoid(sc, (sr[0] - 6, sr[1] - 6, sr[2] - 6), angle_deg=0) & stomach
    b.paint(inner, "stomach_content")
    b.paint(inner & (b.z > sc[2] + 0.45 * sr[2]) & (b.y > sc[1]), "air")

    # Pancreas: a chain of small ellipsoids from the head (right, near the IVC) to the tail (left, near the spleen).
    t = np.linspace(0, 1, 9)
    px = 30 - 100 * t + rng.uniform(-4, 4)
    py = vy + 55 + 10 * np.sin(np.pi * t) + rng.uniform(-5, 5)
    pz = -5 + 20 * t + rng.uniform(-8, 8)
    pancreas = np.zeros(spec.shape, dtype=bool)
    for xi, yi, zi, ti in zip(px, py, pz, t):
        pancreas |= np.broadcast_to(b.ellipsoid((xi, yi, zi), (14, 10 - 3 * ti, 12 - 2 * ti)), spec.shape)
    b.paint(pancreas & cavity, "pancreas", LABELS["pancreas"])
    b.paint(b.ellipsoid((s(55, 6), s(55, 6), s(0)), (j(15), j(14), j(32))) & cavity, "gallbladder", LABELS["gallbladder"])

    texture = ndimage.gaussian_filter(rng.normal(size=spec.shape).astype(np.float32), sigma=2.0)
    hu = b.hu + NOISE_HU * rng.standard_normal(spec.shape, dtype=np.float32) + 40 * texture
    hu = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    label = b.label
    affine = np.diag([*spec.spacing, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * sp for n, sp in zip(spec.shape, spec.spacing)]
    if spec.orientation.upper() == "LPS":
        # Same anatomy stored with the first two axes reversed (as DICOM-derived files often are).
        hu, label = hu[::-1, ::-1].copy(), label[::-1, ::-1].copy()
        affine[:2, :2] *= -1
        affine[:2, 3] *= -1
    elif spec.orientation.upper() != "RAS":
        raise ValueError(f"phantom orientation must be RAS or LPS, got {spec.orientation!r}")
    return hu, label, affine


def write_phantoms(out_dir: str | Path, n: int = 8, seed: int = 0, spec: PhantomSpec | None = None) -> Path:
    """Write ``n`` phantoms as NIfTI (imagesTr/, labelsTr/) with a decathlon ``dataset.json``; return its path.

    The last ⌈n/5⌉ cases (at least one when n ≥ 2) form the ``validation`` split.
    """
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    out = Path(out_dir)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    spec = spec or PhantomSpec()
    entries = []
    for i in range(n):
        hu, label, affine = make_phantom(seed * 100_003 + i, spec)
        name = f"phantom_{i:03d}.nii.gz"
        img = nib.Nifti1Image(hu, affine)
        img.header.set_xyzt_units("mm")
        nib.save(img, out / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), out / "labelsTr" / name)
        entries.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
    n_val = 0 if n < 2 else max(1, -(-n // 5))
    meta = {
        "name": "subfore-phantoms",
        "description": f"synthetic abdominal CT phantoms (seed {seed}, spacing {list(spec.spacing)} mm, {spec.orientation})",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in BTCV_NAMES.items()},
        "numTraining": n - n_val,
        "training": entries[: n - n_val],
        "validation": entries[n - n_val :],
    }
    return write_json(out / "dataset.json", meta)


def write_nnunet_raw(phantom_dir: str | Path, raw_dir: str | Path) -> Path:
    """Expose the phantoms of ``phantom_dir`` (written by :func:`write_phantoms`) as an nnU-Net v2 raw dataset.

    ``raw_dir`` is ``$nnUNet_raw/DatasetXXX_Name``: imagesTr/CASE_0000.nii.gz and labelsTr/CASE.nii.gz are symlinks
    to the phantoms, and dataset.json names the channel and the BTCV labels. Returns ``raw_dir``.
    """
    src, raw = Path(phantom_dir), Path(raw_dir)
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(exist_ok=True)
    images = sorted((src / "imagesTr").glob("*.nii.gz"))
    for f in images:
        case = f.name[: -len(".nii.gz")]
        (raw / "imagesTr" / f"{case}_0000.nii.gz").symlink_to(f.resolve())
        (raw / "labelsTr" / f.name).symlink_to((src / "labelsTr" / f.name).resolve())
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {name: i for i, name in BTCV_NAMES.items()},
        "numTraining": len(images), "file_ending": ".nii.gz"}))
    return raw


def ensure_phantoms(source) -> None:
    """Generate the built-in phantoms a config asks for (``dir``, ``n``, ``seed``, ``spacing``) when absent.

    Launch rank 0 writes them; the other ranks wait for its dataset.json (several processes, one folder).
    """
    if source is None:
        return

    def write() -> None:
        logging.getLogger(__name__).warning("generating %d phantoms in %s", source.n, source.dir)
        write_phantoms(source.dir, n=source.n, seed=source.seed, spec=PhantomSpec(spacing=source.spacing))

    first_rank_prepares(Path(source.dir) / "dataset.json", write)
