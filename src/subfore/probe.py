"""Did pretraining learn anything? A linear probe on frozen features, always beside a random-init baseline.

The network is frozen; the features its output layer would read (the decoder's last feature map) are computed
once per volume without gradients; a 1×1×1 convolution (a linear classifier per voxel) is trained on them for a
fixed number of steps with a fixed seed, on class-balanced voxel samples, and scored by per-class Dice on
held-out volumes. The same probe runs on a randomly initialised network of the same architecture.

    >>> from subfore.probe import ProbeSettings, probe_encoder
    >>> probe_encoder("runs/demo/encoder.pt", ProbeSettings(data="data/phantoms/dataset.json"), "runs/demo/probe.json")
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from monai.transforms import Compose
from torch import nn

from .config import ModelConfig, ProbeSettings
from .data.datalist import case_id, load_datalists
from .data.dataset import check_labels, load_item
from .data.presets import Preset
from .data.transforms import label_checks, preprocess, remap_labels
from .engine.run import inference_precision
from .errors import DataError, SubforeError
from .io import check_output, read_jsonl, write_json, write_text
from .progress import track
from .models.artifact import read_encoder
from .models.registry import backbone_spec, resolve_backbone
from .report import bar_chart, dice_per_class, line_chart

# Bumped whenever the probe's protocol changes its numbers; a study recomputes probes of another version.
PROBE_VERSION = 2
ABSENT = "a class absent from a case's ground truth is excluded from that case's Dice and from the means"


class FeatureExtractor(nn.Module):
    """(B, C, D, H, W) → (B, F, D, H, W): what the network's output layer reads (its input, via a hook)."""

    def __init__(self, net: nn.Module, name: str) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self._seen: torch.Tensor | None = None
        backbone_spec(name).head_module(net).register_forward_hook(lambda m, args, out: setattr(self, "_seen", args[0]))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.net(x)
        seen, self._seen = self._seen, None
        return seen.float()


def extract(extractor: nn.Module, item: dict, preset: Preset, roi, settings: ProbeSettings,
            device: torch.device, precision: str = "32") -> tuple[torch.Tensor, torch.Tensor]:
    """One volume: (features (N, F) float32 on the CPU, labels (N,) long), computed without gradients.

    precision: the network's autocast (``32``, ``bf16``, ``fp16``: the run's); features are kept in fp32."""
    d = load_item(Compose(preprocess(preset, ["image", "label"])), item)
    image = torch.as_tensor(d["image"])[None].float().to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        feats = sliding_window_inference(image, list(roi), settings.sw_batch_size, extractor, overlap=0.25,
                                         mode="gaussian", sw_device=device, device="cpu")
    label = torch.as_tensor(d["label"])[0]
    label = label.round()  # nearest-neighbour resampled ids, rounded before they index anything
    label = remap_labels(label, settings.label_map) if settings.label_map else label.long().clamp_min(0)
    return torch.as_tensor(feats)[0].flatten(1).T.contiguous(), label.flatten()


def subsample(feats: torch.Tensor, label: torch.Tensor, per_class: int, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``per_class`` random voxels of each class: the head's training pool stays small on any volume."""
    keep = []
    for c in torch.unique(label):
        idx = torch.nonzero(label == c).flatten()
        keep.append(idx[torch.randperm(idx.numel(), generator=generator)[:per_class]])
    keep = torch.cat(keep)
    return feats[keep], label[keep]


def fit_linear(train: list[tuple[torch.Tensor, torch.Tensor]], n_classes: int,
               settings: ProbeSettings) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """Train the 1×1×1 head (a linear map per voxel) on standardised features: (head, mean, std)."""
    x = torch.cat([f for f, _ in train])
    y = torch.cat([lab for _, lab in train])
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    counts = torch.bincount(y, minlength=n_classes).double()
    weights = (1.0 / counts.clamp_min(1))[y]  # class-balanced: a small organ is sampled as often as the liver
    g = torch.Generator().manual_seed(settings.seed)
    head = nn.Linear(x.shape[1], n_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=settings.lr)
    for _ in range(settings.steps):
        idx = torch.multinomial(weights, settings.voxels, replacement=True, generator=g)
        loss = nn.functional.cross_entropy(head(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head, mean, std


def dice_counts(pred: torch.Tensor, label: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(classes 1…K-1, [Dice, present]) for one volume's voxels (N,); Dice 0 where the class is absent."""
    dice = dice_per_class(pred.view(1, 1, -1), label.view(1, 1, -1), n_classes)[0].double()
    present = torch.isfinite(dice)
    return torch.stack([dice.nan_to_num(0.0), present.double()], 1)


def _summary(dice: list[float], names: list[str]) -> dict[str, Any]:
    per = {n: (None if math.isnan(v) else round(v, 6)) for n, v in zip(names, dice)}
    vals = [v for v in per.values() if v is not None]
    return {"mean_dice": round(sum(vals) / len(vals), 6) if vals else None, "dice": per}


class Probe:
    """The probe's data, read once; ``run(net)`` scores any network of the architecture it was built for."""

    def __init__(self, settings: ProbeSettings, model: ModelConfig | dict, in_channels: int, roi, preset: Preset,
                 device: str | torch.device = "cpu", progress: bool = False, precision: str = "32") -> None:
        model = ModelConfig.model_validate(model) if isinstance(model, dict) else model
        self.settings, self.model, self.in_channels, self.roi, self.preset = settings, model, in_channels, roi, preset
        self.backbone = resolve_backbone(model)  # nnU-Net plans read once, however often the probe runs
        self.backbone.check_roi(roi)
        self.device = torch.device(device)
        self.train_items = load_datalists(settings.data, settings.split)[: settings.limit]
        self.test_items = load_datalists(settings.test_data or settings.data, settings.test_split)
        for item in self.train_items + self.test_items:
            if "label" not in item:
                raise DataError(item["image"], "has no label: the probe needs labelled volumes")
        # Every label read and checked (readable, 3D, integer ids) before any network runs; the map sends others to 0.
        check_labels(self.train_items + self.test_items, label_checks(None, None, None, 2 ** 31 - 1))
        self.progress, self.precision = progress, precision
        ids = set(settings.label_map.values()) if settings.label_map else None
        self.n_classes = (max(ids) + 1) if ids else None
        self.names = self._names()

    def _names(self) -> list[str] | None:
        src = self.settings.data if isinstance(self.settings.data, str) else self.settings.data[0]
        path = Path(src) if str(src).endswith(".json") else Path(src) / "dataset.json"
        if self.settings.label_map or not path.is_file():
            return None
        labels = json.loads(path.read_text()).get("labels") or {}
        try:
            return [labels[str(i)] for i in range(1, max(int(k) for k in labels) + 1)]
        except (KeyError, ValueError):
            return None

    def network(self, seed: int | None = None) -> nn.Module:
        """A fresh network of the architecture (seeded: the baseline's random init is fixed too)."""
        if seed is not None:
            torch.manual_seed(seed)
        return self.backbone.build(self.in_channels, self.in_channels, self.roi)

    def run(self, net: nn.Module, which: str = "pretrained") -> dict[str, Any]:
        """Frozen features of ``net`` → fitted head → {'mean_dice', 'dice': {class: value}} on the test volumes.

        Training volumes contribute at most ``voxels`` per class each; test volumes are scored one at a time, so
        memory holds one volume's features.
        """
        extractor = FeatureExtractor(net.to(self.device), self.model.name)
        g = torch.Generator().manual_seed(self.settings.seed)
        what = f"probe ({which})"
        train = [subsample(*extract(extractor, item, self.preset, self.roi, self.settings, self.device,
                                    self.precision), self.settings.voxels, g)
                 for item in track(self.train_items, f"{what} train", case_id, self.progress)]
        n = self.n_classes or int(max(int(lab.max()) for _, lab in train)) + 1
        head, mean, std = fit_linear(train, n, self.settings)
        total = torch.zeros(n - 1, 2, dtype=torch.float64)
        for item in track(self.test_items, f"{what} test", case_id, self.progress):
            feats, label = extract(extractor, item, self.preset, self.roi, self.settings, self.device, self.precision)
            with torch.no_grad():
                pred = head((feats - mean) / std).argmax(1)
            total += dice_counts(pred, label, n)
        names = self.names if self.names and len(self.names) == n - 1 else [f"class_{i}" for i in range(1, n)]
        return _summary((total[:, 0] / total[:, 1]).tolist(), names)  # 0/0 → NaN: absent from every test case

    def baseline(self) -> dict[str, Any]:
        return self.run(self.network(seed=self.settings.seed), "random init")


def load_into(net: nn.Module, state: dict[str, torch.Tensor], name: str, source: str | Path,
              encoding: str = "dense") -> None:
    """Load an encoder state into ``net`` of family ``name``: everything but the output layer must fit; of a
    ``visible`` (MAE) pretraining only the ViT was trained, so the rest of ``net`` stays at its (seeded) init."""
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape than the architecture its metadata names
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc).splitlines()[0])
        raise SubforeError(f"{source}: does not fit the architecture it names ({first})") from None
    spec = backbone_spec(name)
    head = spec.head
    if encoding == "visible":
        missing = [k for k in missing if k.startswith(spec.encoder)]
    if unexpected or any(not k.startswith(head) for k in missing):
        bad = (unexpected or [k for k in missing if not k.startswith(head)])[0]
        raise SubforeError(f"{source}: does not fit the architecture of its encoder.json (e.g. {bad})")


def probe_encoder(encoder: str | Path, settings: ProbeSettings, out: str | Path, device: str = "cpu",
                  progress: bool = True) -> dict:
    """Probe ``encoder`` (with its encoder.json) and the random-init baseline; write probe.json, .md and .png.

    progress: a bar and a line per volume on stderr."""
    check_output(out)
    meta, state = read_encoder(encoder)
    # The precision a pretraining on this device runs at (bf16 on a GPU that has it, 32 on the CPU).
    precision = inference_precision("auto", "cuda" if torch.device(device).type == "cuda" else "cpu")
    probe = Probe(settings, meta.model, meta.in_channels, meta.roi, meta.preset, device, progress, precision)
    net = probe.network(seed=settings.seed)
    load_into(net, state, meta.name, encoder, meta.model.get("encoding", "dense"))
    pretrained = probe.run(net)
    baseline = probe.baseline()
    diff = None if pretrained["mean_dice"] is None or baseline["mean_dice"] is None else \
        round(pretrained["mean_dice"] - baseline["mean_dice"], 6)
    result = {
        "encoder": str(encoder), "step": meta.step, "pretrained": pretrained, "baseline": baseline,
        "difference": diff, "absent_class_rule": ABSENT,
        "protocol": {"head": "linear 1x1x1 on the output layer's input features (standardised), frozen network",
                     "train_volumes": len(probe.train_items), "test_volumes": len(probe.test_items),
                     **settings.model_dump(mode="json", exclude={"every"})},
    }
    out = write_json(out, result)
    write_text(out.with_suffix(".md"), markdown_line(result) + "\n")
    plot(result, out.with_suffix(".png"))
    return result


def markdown_line(result: dict) -> str:
    """One line for a report: pretrained vs random init, with the protocol's size."""
    p, b, d, proto = result["pretrained"], result["baseline"], result["difference"], result["protocol"]
    fmt = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    sign = "" if d is None else ("+" if d >= 0 else "−")
    return (f"linear probe ({proto['steps']} steps, {proto['train_volumes']} train / {proto['test_volumes']} test "
            f"volumes): mean Dice {fmt(p['mean_dice'])} % pretrained vs {fmt(b['mean_dice'])} % random init "
            f"({sign}{fmt(abs(d)) if d is not None else '–'} points)")


def plot(result: dict, path: Path) -> None:
    """Per-class Dice bars: pretrained beside the random-init baseline."""
    names = list(result["pretrained"]["dice"])
    series = [(f"{label} (mean {result[key]['mean_dice'] or 0:.3f})", [result[key]["dice"][n] for n in names])
              for key, label in (("pretrained", "pretrained"), ("baseline", "random init"))]
    bar_chart(path, names, series, "linear-probe Dice (frozen network)", group_width=0.35)


def plot_curve(metrics: Path, path: Path) -> None:
    """probe_dice over pretraining steps (RUN_DIR/metrics.jsonl), with the random-init baseline as a line."""
    rows = read_jsonl(metrics)
    pts = [(r["step"], r["probe_dice"]) for r in rows if r.get("probe_dice") is not None]
    base = next((r["probe_baseline"] for r in rows if r.get("probe_baseline") is not None), None)
    line_chart(path, [("pretrained (frozen)", pts)], "pretraining step", "linear-probe mean Dice",
               None if base is None else ("random init", base))
