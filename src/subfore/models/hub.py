"""A model folder users can publish: ``model.safetensors``, ``config.json`` and a model card ``README.md``, the layout
the Hugging Face Hub expects (``huggingface-cli upload USER/NAME DIR`` publishes it; nothing here uploads).

    >>> export_hub("runs/demo", "hub/subfore-swinunetr-demo")

``config.json`` is the run's typed encoder.json plus ``network`` (the class and constructor arguments that rebuild
it without subfore) and ``library_name``; every subfore loader accepts the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from .. import __version__
from ..errors import SubforeError
from ..io import write_json, write_safetensors, write_text
from .artifact import EncoderMeta, header, read_encoder
from .monai import CONSTRUCTORS
from .nnunet.nnssl import citations


def network_entry(meta: EncoderMeta) -> dict | None:
    """The class (dotted) and constructor arguments of the pretrained network, out_channels left to the user."""
    m = meta.model
    if m["name"] in CONSTRUCTORS:
        cls, args = CONSTRUCTORS[m["name"]]
        try:  # encoder.json holds the whole model section, every size the builder reads
            kwargs = args(SimpleNamespace(**m), meta.in_channels, 1, meta.roi)
        except AttributeError as exc:
            raise SubforeError(f"encoder.json's model section lacks {exc.name!r}; rerun the export of a newer run") \
                from None
        kwargs.pop("out_channels")
        kwargs.pop("use_checkpoint", None)  # a training-time memory choice, not part of the weights
        return {"class": f"monai.networks.nets.{cls.__name__}", "kwargs": json.loads(json.dumps(kwargs))}
    arch = (meta.nnunet or {}).get("architecture") or m.get("nnunet_architecture")
    if arch:
        return {"class": arch["network_class_name"], "kwargs": arch["arch_kwargs"],
                "kwargs_requiring_import": list(arch.get("_kw_requires_import", [])), "input_channels": meta.in_channels,
                "builder": "nnunetv2.utilities.get_network_from_plans.get_network_from_plans"}
    return None


def _snippet(net: dict | None) -> str:
    if net is None:
        return "This backbone has no loader outside subfore; use `subfore finetune --pretrained DIR`."
    if net["class"].startswith("monai."):
        cls = net["class"].rsplit(".", 1)[-1]
        return f"""```python
import json
from monai.networks.nets import {cls}
from safetensors.torch import load_file

net_cfg = json.load(open("config.json"))["network"]
net = {cls}(**net_cfg["kwargs"], out_channels=14)          # your number of classes
missing, unexpected = net.load_state_dict(load_file("model.safetensors"), strict=False)
assert not unexpected   # missing: only the output layer, trained from scratch
```"""
    return """```python
import json
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from safetensors.torch import load_file

n = json.load(open("config.json"))["network"]
net = get_network_from_plans(n["class"], n["kwargs"], n["kwargs_requiring_import"], n["input_channels"], 14,
                             deep_supervision=False)
missing, unexpected = net.load_state_dict(load_file("model.safetensors"), strict=False)
```
In nnU-Net itself: `subfore export nnssl RUN_DIR --out ckpt.pth` (nnU-Net's main branch, `PretrainedTrainer`) or
`subfore export nnunet RUN_DIR --out weights.pth --plans PLANS` (`nnUNetv2_train -pretrained_weights`)."""


def model_card(meta: EncoderMeta, net: dict | None) -> str:
    """README.md of the folder: what the weights are, how to load them, what made them, fields to fill."""
    m, p = meta.model, meta.preset
    masking = meta.masking or {}
    data = meta.data or {}
    prep = (f"{p.modality}, spacing {list(p.spacing)} mm ({p.orientation})" +
            (f", window [{p.a_min:g}, {p.a_max:g}] HU → [{p.b_min:g}, {p.b_max:g}]" if p.modality == "ct" else ""))
    probe = meta.probe or {}
    probe_line = (f"- Linear probe (frozen network): mean Dice {probe.get('mean_dice')} at step {probe.get('step')} vs "
                  f"{probe.get('random_init_mean_dice')} at random init\n") if probe else ""
    cites = "\n".join(f"- {c['name']}: {' '.join(c['apa_citations'])}" for c in citations(m["name"],
                                                                                           masking.get("strategy")))
    return f"""---
library_name: subfore
tags: [medical-imaging, self-supervised, masked-image-modeling, 3d, segmentation]
license: other  # fill in: the licence of these weights and of the data they were trained on
---
# {m['name']} pretrained by masked image modelling ({masking.get('strategy', 'unknown')} masks)

Encoder and decoder weights of a 3D segmentation network ({net['class'] if net else m['name']}), pretrained
without labels by subfore {meta.subfore_version or __version__}. The output layer is not included: finetune with
your own classes.

## Load it

{_snippet(net)}

With subfore: `subfore finetune --config CONFIG --pretrained THIS_FOLDER`, `subfore probe --encoder THIS_FOLDER`,
`subfore pretrain --config CONFIG --init-from THIS_FOLDER`.

## How it was made

- Backbone: `{json.dumps(m)}`, {meta.in_channels} input channel(s), crops {list(meta.roi)}
- Preprocessing: {prep}
- Masking: `{json.dumps(masking)}`
- Optimiser steps: {meta.step}
- Data: {data.get('volumes', 'unknown')} volumes from {', '.join(data.get('sources', [])) or 'unknown'}
{probe_line}
## Licence and citation

- Licence: fill in (the data's terms bind the weights)
- Cite the methods used:
{cites}
- Cite this model: fill in
"""


def export_hub(run_dir: str | Path, out: str | Path) -> Path:
    """Write ``out/`` with model.safetensors, config.json and README.md for the pretraining in RUN_DIR."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SubforeError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise SubforeError(f"{out}: a non-empty folder that is not a model folder; choose an empty or new one")
    meta, state = read_encoder(run_dir)
    net = network_entry(meta)
    config = {"library_name": "subfore", **meta.dump(), **({"network": net} if net else {})}
    # Weights first, card last: a folder with a README.md is complete.
    write_safetensors(out / "model.safetensors", state, header(meta))
    write_json(out / "config.json", config)
    write_text(out / "README.md", model_card(meta, net))
    return out
