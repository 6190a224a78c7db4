"""The closed set of nnU-Net networks a file may describe: every dotted name any file or config carries is resolved
here, against an allow-list, and nowhere else.

An nnU-Net architecture is data: ``{"network_class_name", "arch_kwargs", "_kw_requires_import"}`` (nnU-Net's plans;
nnssl writes ``arch_class_name`` and ``arch_kwargs_requiring_import``). A file may choose among what subfore knows
(as a Hugging Face ``config.json`` names one of the library's architectures), never add to it:

- the network: dynamic-network-architectures' ``ResidualEncoderUNet`` or ``PlainConvUNet`` at their own module
  path (nnssl's bare names too), or nnssl's ``ResEncL`` preset (handled by :mod:`.nnssl`);
- ``conv_op``, ``norm_op``, ``dropout_op``, ``nonlin``: a ``torch.nn`` class of that kind (:data:`OPS`), named
  ``torch.nn.X`` or ``torch.nn.modules.<module>.X``;
- every other keyword argument: a number, bool, string, None, or a list/dict of those.

Anything else is refused in one line naming the file, the key and the name, before anything is imported or built.
No name from a file ever reaches ``pydoc.locate`` or ``importlib``: classes come from ``getattr`` on ``torch.nn``
and on one fixed dynamic-network-architectures module, and only for names in these tables.
"""

from __future__ import annotations

import copy
from typing import Any

from ...errors import SubforeError

DNA_MODULE = "dynamic_network_architectures.architectures.unet"
#: the network classes subfore builds, by the dotted name nnU-Net's plans write
NETWORKS = {f"{DNA_MODULE}.{name}": name for name in ("ResidualEncoderUNet", "PlainConvUNet")}
#: nnssl writes the same classes by their bare names
BARE = {name: dotted for dotted, name in NETWORKS.items()}

#: keyword → (what it must be, the torch.nn classes allowed)
OPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "conv_op": ("a torch.nn convolution", ("Conv1d", "Conv2d", "Conv3d")),
    "norm_op": ("a torch.nn normalisation", ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "BatchNorm1d",
                                             "BatchNorm2d", "BatchNorm3d", "GroupNorm")),
    "dropout_op": ("a torch.nn dropout", ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d")),
    "nonlin": ("a torch.nn activation", ("ReLU", "LeakyReLU", "PReLU", "RReLU", "ReLU6", "ELU", "SELU", "CELU", "GELU",
                                         "SiLU", "Mish", "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid", "Hardtanh",
                                         "Softplus", "Softsign", "LogSigmoid", "Tanhshrink", "Identity")),
}
#: keyword arguments a file may not set: subfore passes them itself (or, for ``block``, they are classes)
RESERVED = ("input_channels", "num_classes", "block")
#: the key names of each layout: (class, keyword arguments, keywords that are dotted names)
PLANS_KEYS = ("network_class_name", "arch_kwargs", "_kw_requires_import")
NNSSL_KEYS = ("arch_class_name", "arch_kwargs", "arch_kwargs_requiring_import")


def _builds() -> str:
    return f"subfore builds {' and '.join(NETWORKS.values())} ({DNA_MODULE}) and nnssl's ResEncL"


def _plain(value: Any) -> bool:
    """A number, bool, string, None, or a list/dict (string keys) of those, at any depth."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def canonical_op(key: str, name: Any, where: str) -> str | None:
    """The one spelling of an op name (``torch.nn.Conv3d`` → ``torch.nn.modules.conv.Conv3d``) if ``key`` allows
    that class; else refuse.

    ``where``: the file and the dotted key, for the message.
    """
    what, allowed = OPS[key]
    if name is None:
        if key == "conv_op":
            raise SubforeError(f"{where} = None; the network needs {what} ({', '.join(allowed)})")
        return None
    if not isinstance(name, str):
        raise SubforeError(f"{where} = {name!r} is not {what}; {_builds()} with {', '.join(allowed)}")
    short = name.rsplit(".", 1)[-1]
    parent = name[: -len(short) - 1] if "." in name else ""
    if short in allowed:
        import torch.nn

        cls = getattr(torch.nn, short)
        if parent in ("torch.nn", cls.__module__):
            return f"{cls.__module__}.{short}"
    raise SubforeError(f"{where} = {name!r} is not {what}; {_builds()} with {', '.join(allowed)}")


def check(arch: Any, source: Any, prefix: str = "", keys: tuple[str, str, str] = PLANS_KEYS) -> dict:
    """A validated copy of an architecture entry, in nnU-Net's plans layout (bare nnssl class names made dotted).

    source: the file (or config) it came from (None: the message starts at the key); prefix: where the entry sits in it (``architecture_plans.``);
    keys: the entry's own key names (:data:`PLANS_KEYS`, or :data:`NNSSL_KEYS` for an nnssl plan).
    Returns ``{"network_class_name", "arch_kwargs", "_kw_requires_import"}``; refuses in one line otherwise.
    """
    cls_key, kw_key, imp_key = keys
    at = f"{source}: {prefix}" if source is not None else prefix
    if not isinstance(arch, dict):
        raise SubforeError(f"{at.rstrip('.')} is not an architecture entry (a dict with {cls_key} and {kw_key})")
    name = arch.get(cls_key)
    if not isinstance(name, str) or (name not in NETWORKS and name not in BARE):
        raise SubforeError(f"{at}{cls_key} = {name!r} is not a network subfore builds; {_builds()}")
    kwargs = arch.get(kw_key)
    if not isinstance(kwargs, dict):
        raise SubforeError(f"{at}{kw_key} is {type(kwargs).__name__}, not the network's keyword arguments (a dict)")
    requires = arch.get(imp_key) or []
    if not isinstance(requires, (list, tuple)) or not all(isinstance(k, str) for k in requires):
        raise SubforeError(f"{at}{imp_key} is not a list of keyword names")
    for key in requires:
        if key not in OPS:
            raise SubforeError(f"{at}{imp_key} names {key!r}; subfore resolves only {', '.join(OPS)} (torch.nn "
                               f"classes), nothing else a file names is imported")
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        where = f"{at}{kw_key}.{key}"
        if not isinstance(key, str) or key in RESERVED:
            raise SubforeError(f"{where}: a keyword subfore sets itself or does not take from files")
        if key in OPS:
            canonical_op(key, value, where)
            out[key] = value  # kept as written (both spellings resolve): files round-trip unchanged
        elif not _plain(value):
            raise SubforeError(f"{where} is a {type(value).__name__}; keyword arguments are numbers, bools, strings, "
                               f"None, or lists and dicts of those")
        elif isinstance(value, str):
            # Only the four op keywords are names; any other string would reach the network class as it is.
            raise SubforeError(f"{where} = {value!r}: a string where the network takes none ({', '.join(OPS)} are "
                               f"the only names a file may give)")
        else:
            out[key] = copy.deepcopy(value)
    if "conv_op" not in out:
        raise SubforeError(f"{at}{kw_key} lacks conv_op")
    # A listed keyword the entry does not set is dropped: nnU-Net's builder would fail on it (KeyError).
    return {"network_class_name": BARE.get(name, name), "arch_kwargs": out,
            "_kw_requires_import": [k for k in requires if k in out]}


def network_class(arch: dict):
    """The dynamic-network-architectures class of a :func:`check`-ed architecture (the only import it makes)."""
    name = arch["network_class_name"]
    if name not in NETWORKS:  # check() guarantees this; kept so that no caller can pass an unchecked name
        raise SubforeError(f"{name!r} is not a network subfore builds; {_builds()}")
    from dynamic_network_architectures.architectures import unet

    return getattr(unet, NETWORKS[name])


def op_classes(arch: dict) -> dict:
    """The keyword arguments of a :func:`check`-ed architecture with the op names replaced by torch.nn classes."""
    import torch.nn

    kwargs = copy.deepcopy(arch["arch_kwargs"])
    for key in OPS:
        if isinstance(kwargs.get(key), str):
            kwargs[key] = getattr(torch.nn, kwargs[key].rsplit(".", 1)[-1])
    return kwargs


def first_difference(mine: dict, theirs: dict, ignore: tuple[str, ...] = ()) -> str | None:
    """``key: a vs b`` for the first of class and keyword arguments in which two checked architectures differ."""
    if mine["network_class_name"] != theirs["network_class_name"]:
        return f"network_class_name: {theirs['network_class_name']} in the file, {mine['network_class_name']} here"
    a, b = _canonical(mine["arch_kwargs"]), _canonical(theirs["arch_kwargs"])
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        if _listed(a.get(key)) != _listed(b.get(key)):
            return f"arch_kwargs.{key}: {b.get(key, 'absent')!r} in the file, {a.get(key, 'absent')!r} here"
    return None


def _canonical(kwargs: dict) -> dict:
    """Op names in one spelling (``torch.nn.modules.activation.LeakyReLU`` for ``torch.nn.LeakyReLU``)."""
    return {k: canonical_op(k, v, k) if k in OPS else v for k, v in kwargs.items()}


def _listed(value: Any) -> Any:
    """Tuples as lists, so JSON-read and Python-written entries compare equal."""
    if isinstance(value, (list, tuple)):
        return [_listed(v) for v in value]
    if isinstance(value, dict):
        return {k: _listed(v) for k, v in value.items()}
    return value


def scan(obj: Any, source: Any, prefix: str = "") -> None:
    """Check every architecture entry anywhere in ``obj`` (see :func:`_scan`); absurdly deep data is refused."""
    try:
        _scan(obj, source, prefix)
    except RecursionError:
        raise SubforeError(f"{source}: nested too deeply to be a weights file's or plans' plain data") from None


def _scan(obj: Any, source: Any, prefix: str = "") -> None:
    """Check every architecture entry anywhere in ``obj`` (a file's plain data), so that none is read unchecked.

    Entries are dicts with ``network_class_name`` (nnU-Net's plans), ``arch_class_name`` (nnssl) or ``class`` with
    ``kwargs_requiring_import`` (a model folder's ``network``). Tensors and other leaves are skipped.
    """
    if isinstance(obj, dict):
        if "network_class_name" in obj:
            check(obj, source, prefix)
        elif "arch_class_name" in obj and obj["arch_class_name"] != "ResEncL":
            check(obj, source, prefix, NNSSL_KEYS)
        elif "class" in obj and "kwargs_requiring_import" in obj:
            check(obj, source, prefix, ("class", "kwargs", "kwargs_requiring_import"))
        for key, value in obj.items():
            if isinstance(value, (dict, list, tuple)):
                _scan(value, source, f"{prefix}{key}.")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            if isinstance(value, (dict, list, tuple)):
                _scan(value, source, f"{prefix}{i}.")
