"""The study protocol: which case trains, selects the checkpoint and is scored; a test case may do nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.datalist import case_id, load_datalists
from ..errors import ConfigError
from ..finetune.data import finetune_cases
from .config import StudyConfig, existing, finetune_config


def _text_key(source: str, split: str) -> str:
    """A datalist that does not exist yet (a placeholder path) is compared by its resolved path and split."""
    return f"{Path(source).expanduser().resolve()}:{split}"


def _cases(sources: str | list[str] | None, split: str) -> tuple[dict[str, str], set[str]]:
    """({resolved image file: case id} for the datalists that exist, {text keys} for those that do not)."""
    files: dict[str, str] = {}
    texts: set[str] = set()
    for src in ([] if sources is None else [sources] if isinstance(sources, str) else sources):
        texts.add(_text_key(src, split))
        if Path(src).expanduser().exists():
            for item in load_datalists(src, split):
                files[_file_key(item)] = case_id(item)
    return files, texts


def _file_key(item: dict) -> str:
    image = item["image"]
    return str(Path(image[0] if isinstance(image, list) else image).resolve())


def label_counts(cfg: StudyConfig) -> list[int] | None:
    """``study.label_fractions`` as numbers of labelled training cases (a share rounds to at least 1), or None
    without label fractions; raises ConfigError for more cases than finetune_train has. A share of a datalist that
    does not exist yet is left as None (known once the data is there)."""
    fractions = cfg.study.label_fractions
    if fractions is None:
        return None
    fcfg = finetune_config(cfg, Path(cfg.study.study_dir) / "check", 0)
    sources = [fcfg.data.train] if isinstance(fcfg.data.train, str) else list(fcfg.data.train)
    available = None
    if all(Path(x).expanduser().exists() for x in sources):
        available = len(finetune_cases(fcfg.model_copy(update={"data": fcfg.data.model_copy(
            update={"limit_train": None})}))[0])
    counts = []
    for f in fractions:
        n = int(f) if f >= 1 else (None if available is None else max(1, int(f * available + 0.5)))
        if n is not None and available is not None and n > available:
            raise ConfigError(f"study.label_fractions: {n} labelled cases asked for, finetune_train has {available}")
        counts.append(n)
    if None not in counts and len(set(counts)) < len(counts):
        raise ConfigError(f"study.label_fractions {fractions} give the same number of cases twice: {counts}")
    return counts


def check_protocol(cfg: StudyConfig) -> dict:
    """Resolve every role's cases without training; raise ConfigError naming the first test case that is also a
    finetuning training or validation case (the same file, or the same datalist and split for placeholders).

    Returns the protocol: case counts per role, and per test set the cases that were also pretraining data.
    """
    st = cfg.study
    labels = label_counts(cfg)
    # With label fractions, every case the largest run trains on counts as training (an unknown share: all of them).
    most = None if labels is None else (max(labels) if None not in labels else 10**9)
    fcfg = finetune_config(cfg, Path(st.study_dir) / "check", st.seeds[0] if st.seeds else 0, labels=most)
    d = fcfg.data
    train_src = d.train
    roles: dict[str, tuple[dict[str, str], set[str]]] = {}
    sources = [train_src] if isinstance(train_src, str) else list(train_src)
    ft_texts = {_text_key(x, d.train_split) for x in sources}
    if all(Path(x).expanduser().exists() for x in sources):
        train_items, val_items = finetune_cases(fcfg)
        roles["finetuning training"] = ({_file_key(i): case_id(i) for i in train_items}, ft_texts)
        val_files = {_file_key(i): case_id(i) for i in (val_items or [])}
    else:
        # Which cases train and which are held out is unknown until every datalist exists: every case of the
        # ones that do exist counts as both, so a leak is never missed.
        files, _ = _cases(sources, d.train_split)
        roles["finetuning training"] = (files, ft_texts)
        val_files = dict(files)
    if d.holdout:
        roles["finetuning validation"] = (val_files, ft_texts)
    elif d.val:
        files, texts = _cases(d.val, d.val_split)
        roles["finetuning validation"] = (files, texts)
    pre_split = cfg.pretrain.get("data", {}).get("train_split", "training")
    pre_files, pre_texts = _cases(st.pretrain_data + existing(st.pretrain_data_optional), pre_split)
    protocol: dict[str, Any] = {
        "finetune_train": {"data": st.finetune_train.data, "split": st.finetune_train.split,
                           "limit_train": d.limit_train if labels is None else None, "cases": len(roles["finetuning training"][0]) or None},
        "finetune_val": None if st.finetune_val is None else {
            **st.finetune_val.model_dump(exclude_none=True), "cases": len(roles["finetuning validation"][0]) or None},
        "select": st.select, "pretrain_volumes": len(pre_files) or None, "test": {}, "pretrain_overlap": {},
    }
    if labels is not None:
        protocol["finetune_train"]["labels"] = labels
    for t in st.test:
        if t.image:
            files = {str(Path(t.image).resolve()): case_id({"image": t.image})}
            texts: set[str] = set()
        else:
            if t.optional and not all(Path(x).exists() for x in ([t.data] if isinstance(t.data, str) else t.data)):
                files, texts = {}, {_text_key(x, t.split) for x in ([t.data] if isinstance(t.data, str) else t.data)}
            else:
                files, texts = _cases(t.data, t.split)
        for role, (rfiles, rtexts) in roles.items():
            both = sorted(set(files) & set(rfiles))
            if both:
                raise ConfigError(f"study.test '{t.name}': case {files[both[0]]} ({both[0]}) is also a {role} case "
                                  f"({len(both)} shared); test cases must never train or select the checkpoint")
            same = sorted(texts & rtexts)
            if same:
                raise ConfigError(f"study.test '{t.name}': datalist and split {same[0]} are also the {role} data; "
                                  f"test cases must never train or select the checkpoint")
        protocol["test"][t.name] = len(files) or None
        overlap = sorted(files[f] for f in set(files) & set(pre_files))
        overlap += sorted(x for x in texts & pre_texts)
        if overlap:
            protocol["pretrain_overlap"][t.name] = overlap
    return protocol


def describe_protocol(protocol: dict) -> list[str]:
    """Human-readable lines for ``subfore study --check`` and the study log."""
    n = lambda v: "?" if v is None else str(v)  # noqa: E731 - unknown until a placeholder datalist exists
    ft, val = protocol["finetune_train"], protocol["finetune_val"]
    lines = [f"finetune training: {n(ft['cases'])} cases ({ft['data']} '{ft['split']}'"
             + (f", first {ft['limit_train']}" if ft["limit_train"] else "") + ")"]
    if "labels" in ft:
        lines.append(f"labelled cases per finetuning run: {', '.join(n(k) for k in ft['labels'])} (the first N)")
    if val is None:
        lines.append("finetune validation: none")
    elif "holdout" in val:
        lines.append(f"finetune validation: the last {val['holdout']} training cases (holdout), not trained on")
    else:
        lines.append(f"finetune validation: {n(val['cases'])} cases ({val['data']} '{val['split']}')")
    lines.append(f"checkpoint scored: {protocol['select']}")
    lines += [f"test '{name}': {n(k)} cases, none used for training or selection" for name, k in protocol["test"].items()]
    lines.append(f"pretraining: {n(protocol['pretrain_volumes'])} volumes")
    for name, cases in protocol["pretrain_overlap"].items():
        lines.append(f"warning: test '{name}' cases were also pretraining data: {', '.join(cases)}")
    return lines
