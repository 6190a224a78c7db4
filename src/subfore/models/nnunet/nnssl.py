"""nnssl's checkpoint format, both ways: what nnU-Net's main branch finetunes from (``nnUNetv2_preprocess_like_nnssl``,
``PretrainedTrainer``) and what the OpenMind models on Hugging Face are.

A checkpoint is ``{"network_weights": state_dict, "nnssl_adaptation_plan": plan, "citations": [...]}``, loadable
with ``torch.load(weights_only=True)``; the plan (nnssl's ``AdaptationPlan.serialize()``) holds

- ``architecture_plans``: ``arch_class_name`` (``ResEncL`` with ``arch_kwargs`` None, or ``ResidualEncoderUNet`` /
  ``PlainConvUNet``, bare as nnssl writes them or dotted as subfore and nnU-Net's plans do, with the
  dynamic-network-architectures keyword arguments, classes as dotted strings) and ``arch_kwargs_requiring_import``;
- ``pretrain_plan``: an nnssl ``Plan`` whose single configuration gives ``spacing`` and ``patch_size`` in nnU-Net's
  array order (SimpleITK's z, y, x, then ``transpose_forward``) and the ``normalization_schemes``;
- ``pretrain_num_input_channels``, ``recommended_downstream_patchsize``, ``key_to_encoder``, ``key_to_stem``,
  ``keys_to_in_proj`` (module names, no ``.weight``) and ``key_to_lpe`` (None for CNNs).

Everything about nnssl's format lives here. Pure data: no nnU-Net import.
"""

from __future__ import annotations

import copy
from typing import Any

from ...errors import SubforeError
from . import architecture

#: nnssl's name of its ResEnc-L preset (nnssl's ARCHITECTURE_PRESETS), the one preset subfore builds
PRESET = "ResEncL"
PLAN_KEYS = ("architecture_plans", "pretrain_plan", "pretrain_num_input_channels", "recommended_downstream_patchsize",
             "key_to_encoder", "key_to_stem", "keys_to_in_proj", "key_to_lpe")
#: nnssl's ConfigurationPlan fields; nnssl's Plan.from_dict refuses any other key
CONFIGURATION_KEYS = ("data_identifier", "preprocessor_name", "spacing_style", "normalization_schemes",
                      "use_mask_for_norm", "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_mask",
                      "resampling_fn_mask_kwargs", "spacing", "patch_size")

CITATIONS: dict[str, dict[str, Any]] = {
    "foreground": {"type": "masking", "name": "SubFore (HU-based foreground masking)", "apa_citations": [
        "Lee, J., Dang, V., Yu, G.-H., Le, A., Rahman, Z., Jang, J.-H., Lee, H., Kim, K.-Y., Kim, J.-S., & Kim, "
        "J.-Y. HU-based Foreground Masking for 3D Medical Masked Image Modeling."]},
    "anatomask": {"type": "masking", "name": "AnatoMask (reconstruction-guided self-masking)", "apa_citations": [
        "Li, Y., Luan, T., Wu, Y., Pan, S., Chen, Y., & Yang, X. (2024). AnatoMask: Enhancing Medical Image "
        "Segmentation with Reconstruction-guided Self-masking. ECCV 2024."]},
    "hpm": {"type": "masking", "name": "Hard patches mining", "apa_citations": [
        "Wang, H., Song, K., Fan, J., Wang, Y., Xie, J., & Zhang, Z. (2023). Hard Patches Mining for Masked Image "
        "Modeling. CVPR 2023.",
        "Lv, Y., Chen, L., Wang, J., Li, Y., & Chen, F. SelfMedHPM: Self Pre-training With Hard Patches Mining "
        "Masked Autoencoders For Medical Image Segmentation."]},
    "simmim": {"type": "pretraining", "name": "SimMIM", "apa_citations": [
        "Xie, Z., Zhang, Z., Cao, Y., Lin, Y., Bao, J., Yao, Z., Dai, Q., & Hu, H. (2022). SimMIM: A Simple "
        "Framework for Masked Image Modeling. CVPR 2022."]},
    "resenc": {"type": "architecture", "name": "nnU-Net Residual Encoder U-Net", "apa_citations": [
        "Isensee, F., Wald, T., Ulrich, C., Baumgartner, M., Roy, S., Maier-Hein, K., & Jaeger, P. F. (2024). "
        "nnU-Net Revisited: A Call for Rigorous Validation in 3D Medical Image Segmentation. MICCAI 2024."]},
    "resenc_l": {"type": "architecture", "name": "ResEnc-L (nnssl)", "apa_citations": [
        "Wald, T., Ulrich, C., Suprijadi, J., Ziegler, S., Nohel, M., Peretzke, R., Köhler, G., & Maier-Hein, "
        "K. H. (2025). An OpenMind for 3D medical vision self-supervised learning. CVPR 2025."]},
}


def citations(model_name: str, strategy: str | None) -> list[dict]:
    """nnssl's ``citations`` list for a pretraining: its masking (SimMIM for random/block) and its architecture."""
    keys = [strategy if strategy in CITATIONS else "simmim", model_name]
    return [copy.deepcopy(CITATIONS[k]) for k in keys if k in CITATIONS]


def architecture_plans(model_name: str, arch: dict) -> dict:
    """nnssl's ``architecture_plans`` for a subfore nnU-Net architecture (``network_class_name``, ``arch_kwargs``)."""
    if model_name == "resenc_l":  # nnssl's preset: nnU-Net builds it by name, as for the OpenMind checkpoints
        return {"arch_class_name": PRESET, "arch_kwargs": None, "arch_kwargs_requiring_import": None}
    arch = architecture.check(arch, None, "architecture.")
    kwargs = arch["arch_kwargs"]
    # nnssl lists the keyword arguments that are dotted class names (None ones are not imported, not listed)
    needs = [k for k in arch["_kw_requires_import"] if isinstance(kwargs.get(k), str)]
    # The dotted name, as in nnU-Net's plans: nnU-Net then locates the class directly instead of importing every
    # architecture module (Primus needs timm).
    return {"arch_class_name": arch["network_class_name"], "arch_kwargs": kwargs, "arch_kwargs_requiring_import": needs}


def configuration_plan(name: str, spacing: list[float], patch_size: list[int], schemes: list[str],
                       use_mask: list[bool]) -> dict:
    """One nnssl ``ConfigurationPlan`` (every field, nothing else): spacing and patch in nnU-Net's array order."""
    return {"data_identifier": name, "preprocessor_name": "DefaultPreprocessor", "spacing_style": "median",
            "normalization_schemes": list(schemes), "use_mask_for_norm": list(use_mask),
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_mask": "resample_data_or_seg_to_shape",
            "resampling_fn_mask_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "spacing": [float(s) for s in spacing], "patch_size": [int(p) for p in patch_size]}


def check_plan(plan: Any, source: Any) -> dict:
    """The adaptation plan of a checkpoint, with every key nnU-Net's loader reads and an architecture subfore builds
    (:mod:`.architecture`); else one line naming the file and the first bad key."""
    if not isinstance(plan, dict):
        raise SubforeError(f"{source}: 'nnssl_adaptation_plan' is not a dict")
    for key in PLAN_KEYS:
        if key not in plan:
            raise SubforeError(f"{source}: the nnssl adaptation plan lacks '{key}'")
    arch = plan["architecture_plans"]
    if not isinstance(arch, dict) or "arch_class_name" not in arch:
        raise SubforeError(f"{source}: the nnssl adaptation plan's architecture_plans lacks 'arch_class_name'")
    if arch["arch_class_name"] == PRESET:
        if arch.get("arch_kwargs") or arch.get("arch_kwargs_requiring_import"):
            raise SubforeError(f"{source}: architecture_plans names the {PRESET} preset, which takes no arch_kwargs")
    else:
        architecture.check(arch, source, "architecture_plans.", architecture.NNSSL_KEYS)
    confs = (plan["pretrain_plan"] or {}).get("configurations") if isinstance(plan["pretrain_plan"], dict) else None
    if not isinstance(confs, dict) or len(confs) != 1:
        raise SubforeError(f"{source}: the nnssl pretrain_plan needs exactly one configuration")
    conf = next(iter(confs.values()))
    if not isinstance(conf, dict) or "spacing" not in conf or "patch_size" not in conf:
        raise SubforeError(f"{source}: the nnssl pretrain_plan's configuration lacks 'spacing' or 'patch_size'")
    return plan


def subfore_architecture(plan: dict, source: Any) -> tuple[str, dict | None]:
    """(model.name, the checked nnU-Net architecture or None for resenc_l) of a :func:`check_plan`-ed plan."""
    arch = plan["architecture_plans"]
    if arch["arch_class_name"] == PRESET:
        return "resenc_l", None
    return "resenc", architecture.check(arch, source, "architecture_plans.", architecture.NNSSL_KEYS)


def encoder_meta(plan: dict, source: Any) -> dict:
    """encoder.json content for a :func:`check_plan`-ed plan: its architecture, channels, patch and preprocessing
    (nnU-Net's axis order)."""
    from ...data.plans import preset_from_plan

    name, arch = subfore_architecture(plan, source)
    pretrain = plan["pretrain_plan"]
    conf_name, conf = next(iter(pretrain["configurations"].items()))
    if not conf.get("spacing"):
        raise SubforeError(f"{source}: the nnssl pretraining did not resample (spacing None); subfore needs the "
                           f"spacing its network saw")
    channels = int(plan["pretrain_num_input_channels"])
    preset = preset_from_plan(pretrain, conf, source, conf_name, channels)
    model = {"name": name, **({"nnunet_architecture": arch} if arch else {})}
    return {"model": model, "in_channels": channels, "roi": [int(p) for p in conf["patch_size"]],
            "preset": preset.model_dump(mode="json"), "source": "nnssl checkpoint"}
