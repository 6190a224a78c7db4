"""Inference with a finetuned network: its checkpoint reloaded, sliding-window prediction, and label files written
on each input's own grid (``subfore predict``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, Invertd

from pydantic import ValidationError

from .config import FinetuneConfig, format_errors
from .data.brats import from_regions
from .data.datalist import as_list, case_id, load_datalists
from .data.dataset import load_item
from .data.transforms import preprocess
from .errors import ConfigError, SubforeError
from .io import check_output, load_torch, save_figure, write_with
from .models.nnunet.architecture import scan
from .models.registry import build_backbone, resolve_backbone
from .progress import track
from .visualize import mid_planes


#: inference's autocast names (``auto``: the run's own, resolved by :func:`run_precision`)
PRECISIONS = ("auto", "32", "bf16", "fp16")


def check_precision(precision: str, allowed: Sequence[str] = PRECISIONS) -> None:
    """Refuse a precision name in one line naming ``--precision`` (before any case is read)."""
    if precision not in allowed:
        raise SubforeError(f"--precision must be one of {', '.join(allowed)}, got {precision!r}")


def predict_volume(net: torch.nn.Module, image: torch.Tensor, roi, overlap: float, sw_batch_size: int,
                   sigmoid: bool, precision: str = "32") -> torch.Tensor:
    """Sliding-window prediction of one (1, C, D, H, W) volume → labels (1, 1, D, H, W) or regions (1, K, …) bool.

    precision: ``32``, or ``bf16``/``fp16`` autocast (GPU inference); the logits are argmaxed in fp32.
    """
    device = next(net.parameters()).device
    dtypes = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    check_precision(precision, tuple(dtypes))
    with torch.no_grad(), torch.autocast(device.type, dtype=dtypes[precision] or torch.float32,
                                         enabled=dtypes[precision] is not None):
        logits = sliding_window_inference(image.to(device), list(roi), sw_batch_size, net, overlap=overlap,
                                          mode="gaussian")
    logits = torch.as_tensor(logits).float()
    if sigmoid:
        return logits.sigmoid() > 0.5
    return logits.argmax(1, keepdim=True)


def restore_labels(pred: torch.Tensor, image: MetaTensor, axes: Sequence[int] | None = None) -> MetaTensor | None:
    """Labels (C, D, H, W) on ``image``'s preprocessed grid (C = 1, or K regions) → uint8 (C, X, Y, Z) on the
    input's own grid (its affine), nearest neighbour with border padding as Invertd's Spacingd inverse, by one index
    array per axis: no sampling grid over every input voxel (Invertd's, in float64, is the largest allocation of
    predict on a 512²×200 CT).

    axes: the preset's Transposed order (it leaves the affine as it was, so it is undone first). None where the two
    grids are not axis-aligned (then Invertd). Ties (a voxel centre exactly half-way) go to the even index.
    """
    if "original_affine" not in image.meta or len(image.meta.get("spatial_shape", ())) != 3:
        return None
    if isinstance(pred, MetaTensor):  # sliding_window_inference's output carries the preprocessed grid's meta
        pred = pred.as_tensor()
    if axes is not None and tuple(axes) != (0, 1, 2):
        pred = pred.permute(0, *(int(i) + 1 for i in np.argsort(axes)))
    a_pre = np.asarray(image.affine, dtype=np.float64)
    a_in = np.asarray(image.meta["original_affine"], dtype=np.float64)
    shape_in = [int(v) for v in image.meta["spatial_shape"]]
    m = np.linalg.solve(a_pre, a_in)  # input voxel index → preprocessed voxel index
    lin = np.abs(m[:3, :3])
    src = lin.argmax(0)  # the preprocessed axis each input axis runs along
    off = lin.copy()
    off[src, range(3)] = 0
    if sorted(src.tolist()) != [0, 1, 2] or off.max() > 1e-4 * lin.max():
        return None
    p = pred.permute(0, *(int(s) + 1 for s in src))  # a view: the preprocessed axes in the input's order
    p = p.to(torch.uint8 if int(p.max()) < 256 else torch.int32)  # a 1-byte copy, not int64 (argmax's)
    idx = [torch.from_numpy(np.clip(np.rint(m[src[k], k] * np.arange(shape_in[k]) + m[src[k], 3]),
                                    0, p.shape[k + 1] - 1).astype(np.int64)) for k in range(3)]
    out = p[:, idx[0][:, None, None], idx[1][None, :, None], idx[2][None, None, :]]
    return MetaTensor(out, affine=torch.as_tensor(a_in))


def load_finetuned(path: str | Path, device: str | torch.device = "cpu") -> tuple[FinetuneConfig, torch.nn.Module]:
    """Rebuild the network and its config from a ``subfore finetune`` checkpoint."""
    path = Path(path)
    ckpt = load_torch(path, "checkpoint")  # weights_only: a checkpoint from elsewhere runs no code
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if hp.get("kind") != "subfore-finetune":
        raise SubforeError(f"{path}: not a 'subfore finetune' checkpoint (a pretraining checkpoint or encoder.pt "
                           f"cannot segment; finetune it first)")
    scan(hp, path, "hyper_parameters.")  # names in a checkpoint are data: checked before anything reads them
    try:
        cfg = FinetuneConfig.model_validate(hp["config"])
    except ValidationError as err:
        raise ConfigError(format_errors(err, f"{path}: hyper_parameters.config")) from None
    net = build_backbone(cfg.model, cfg.data.channels, cfg.model.out_channels, cfg.data.roi)
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise SubforeError(f"{path}: weights do not fit the architecture its config names ({str(exc).splitlines()[0]})") from None
    return cfg, net.to(device).eval()


def run_precision(cfg: FinetuneConfig, precision: str, device: str | torch.device) -> str:
    """Inference's autocast: ``precision`` as given, or for ``auto`` the one the run trained with (its
    ``train.precision``) on ``device``: bf16 on a CUDA GPU that supports it, 32 on the CPU."""
    check_precision(precision)
    if precision != "auto":
        return precision
    from .engine.run import inference_precision

    return inference_precision(cfg.train.precision, "cuda" if torch.device(device).type == "cuda" else "cpu")


def check_window(cfg: FinetuneConfig, roi: Sequence[int] | None) -> tuple[int, ...]:
    """The sliding-window size to use (``roi`` or the training crop), refused in one line naming ``--roi`` when
    the network cannot take it."""
    if roi is None:
        return tuple(cfg.data.roi)
    try:
        resolve_backbone(cfg.model).check_roi(roi)
    except ConfigError as exc:
        raise SubforeError(str(exc).replace("data.roi", "--roi", 1)) from None
    return tuple(int(r) for r in roi)


def predict(
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    roi: Sequence[int] | None = None,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    device: str = "cpu",
    precision: str = "auto",
    progress: bool = True,
) -> list[Path]:
    """Write one label NIfTI per input on the input's own grid (shape, affine, orientation) plus an overlay PNG.

    An input that fails (unreadable, not 3D, …) does not stop the others: each output is written whole or not at
    all, and a SubforeError at the end names every input that failed and where the others went. ``out_dir`` is
    made only when a first file is written. progress: a bar and a line per case on stderr.
    """
    out_dir = Path(out_dir)
    check_output(out_dir, "folder")
    cfg, net = load_finetuned(checkpoint, device)
    roi = check_window(cfg, roi)
    precision = run_precision(cfg, precision, device)
    items = load_datalists(list(inputs), "training")
    if not items:
        raise SubforeError(f"no input image found in {', '.join(str(i) for i in inputs)}")
    # Outputs are named CASE_seg.nii.gz: two inputs of one name (a/ct.nii.gz, b/ct.nii.gz) would overwrite each
    # other, so they are refused before any inference.
    seen: dict[str, str] = {}
    for item in items:
        name, source = case_id(item), str(as_list(item["image"])[0])
        if name in seen:
            raise SubforeError(f"{source}: has the case name '{name}' of {seen[name]} too; both would be written as "
                               f"{out_dir / (name + '_seg.nii.gz')} (predict one of them into another --out)")
        seen[name] = source
    preset = cfg.data.preset_obj()
    pre = Compose(preprocess(preset, ["image"]))
    invert = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True, to_tensor=True)
    written, failed = [], []
    skipped: dict = {}
    for item in track(items, "predict", case_id, progress, skipped):
        try:
            d = load_item(pre, item)
        except SubforeError as exc:  # a bad input is named at the end; the others are still segmented
            failed.append(str(exc))
            skipped["why"] = str(exc)
            continue
        image = d["image"]
        pred = predict_volume(net, torch.as_tensor(image)[None].float(), roi,
                              overlap if overlap is not None else cfg.finetune.sw_overlap,
                              sw_batch_size or cfg.finetune.sw_batch_size, cfg.sigmoid, precision).cpu()[0]
        if cfg.sigmoid:  # TC/WT/ET → the label ids of the convention the network was trained on
            pred = from_regions(pred, cfg.data.brats_labels or "msd")
        restored = restore_labels(pred, image, preset.axes)
        if restored is None:  # Invertd replays the image's recorded operations backwards onto the prediction.
            d["pred"] = MetaTensor(pred.float(), meta=image.meta, applied_operations=image.applied_operations)
            restored = invert(d)["pred"]
        labels = np.asarray(restored[0]).round().astype(np.uint8)
        affine = np.asarray(restored.affine, dtype=np.float64)
        name = case_id(item)
        path = write_with(out_dir / f"{name}_seg.nii.gz", lambda tmp: nib.save(nib.Nifti1Image(labels, affine), tmp),
                          suffix=".nii.gz")
        _overlay(np.asarray(image[0]), np.asarray(pred[0]), out_dir / f"{name}_overlay.png", name)
        written.append(path)
    if failed:
        where = f"the other {len(written)} label file(s) are in {out_dir}" if written else "nothing was written"
        names = "; ".join(failed[:3]) + (f"; and {len(failed) - 3} more" if len(failed) > 3 else "")
        raise SubforeError(f"{len(failed)} of {len(items)} inputs failed ({names}); {where}")
    return written


def _overlay(image: np.ndarray, labels: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    for ax, (plane, sl), (_, lab) in zip(axes, mid_planes(image), mid_planes(labels)):
        ax.imshow(sl, cmap="gray", origin="lower", vmin=0, vmax=1)
        ax.imshow(np.ma.masked_where(lab == 0, lab), cmap="tab20", vmin=0, vmax=19, alpha=0.5, origin="lower",
                  interpolation="nearest")
        ax.set_title(plane)
        ax.set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
