"""GPU check: samples/s and peak GPU memory of subfore's engine against a plain PyTorch loop, and the crop store's rate.

One command, one table, within a time budget (default 5 min) on one CUDA GPU:

    python benchmarks/gpu_check.py --out runs/gpu_check.json
    python benchmarks/gpu_check.py --tiny              # CPU, seconds: the same code paths on a tiny config (CI)

Training rows — two configs, each trained by two loops, each with ``model.checkpointing`` and ``train.compile``
off and on (2 × 2 × 2 × 2 = 16 rows):

- ``subfore``: configs/pretrain/paper_swinunetr.yaml — SwinUNETR fs 48, 96³, batch 4, SubFore foreground masks
  (16³ subvolumes, ρ 0.6), ``train.precision: auto`` (bf16-mixed on a GPU that has it);
- ``mae``: configs/pretrain/paper_unetr.yaml with ``model.encoding: visible`` and MAE's random masks, exactly
  0.75 of the 16³ patches of each crop (UNETR's ViT-B encodes the visible ones, the MAE decoder reconstructs);
- loop ``engine``: MaskedImageModel under the Trainer ``subfore pretrain`` builds (engine.run.make_trainer:
  precision, gradient clipping, cuDNN autotuning, logger) with its metrics writer; checkpoint files, snapshots
  and the export are off;
- loop ``plain``: the anchor, a hand-written loop over the same network, masks and crops (forward, masked L1,
  backward, clip, AdamW under bf16 autocast; ``torch.compile`` of the network when ``train.compile``).

Each row builds its network, trains ``--warmup`` steps (compilation and cuDNN autotuning happen there), then times
``--steps`` steps. Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps (weights, AdamW state
and activations; the count restarts when they start) and, apart, over the warm-up (autotuning's workspaces,
compilation); on a CPU the process's peak RSS. Every row reports the optimiser steps it took, how often
``torch.utils.checkpoint`` ran per step and how many graphs torch.compile produced, so a setting that is not
honoured shows. The crops are synthetic (a body ellipse in air), the same for every row.

Store row: 5 phantoms written here at 1.5 mm (nothing is downloaded) are built into a crop store, then
pretraining's own training loader (``data.num_workers`` workers) feeds 96³ crops to the GPU (pinned, copied
there); crops/s against the best training row's samples/s says whether the data path keeps up.

The rows run one after another in a worker process (the parent only schedules and prints), memory freed and
counts reset between rows; a row that fails prints as failed with its reason and the rest still run, and a row
that kills its process (a CUDA fault) fails alone: the remaining rows go on in a fresh one. Rows that would start
after ``--budget-s`` print as skipped; compile rows run last (compiling SwinUNETR fs 48 can take minutes).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"subfore": "configs/pretrain/paper_swinunetr.yaml", "mae": "configs/pretrain/paper_unetr.yaml"}
MAE = ["model.encoding=visible", "masking.strategy=random", "masking.ratio=0.75", "masking.exact=true"]
# --tiny: the same configs shrunk to seconds on a CPU (fp32, 32³, batch 1).
# SwinUNETR needs 64³ at least, so the subfore row trains the CPU study's BasicUNet there.
TINY = {"subfore": ["model.name=basicunet", "model.feature_size=4", "data.roi=[32,32,32]", "train.batch_size=1",
                    "train.precision='32'"],
        "mae": ["model.feature_size=8", "model.hidden_size=48", "model.mlp_dim=96", "model.num_heads=2",
                "decoder.width=48", "decoder.depth=1", "decoder.heads=2", "data.roi=[32,32,32]",
                "train.batch_size=1", "train.precision='32'"]}
STORE = {"full": {"phantoms": 5, "spacing": 1.5, "batches": 40},
         "tiny": {"phantoms": 3, "spacing": 4.0, "batches": 4, "num_workers": 1}}
MARK = "@@gpu_check "  # prefix of the worker's result lines on its stdout


# --- rows --------------------------------------------------------------------------------------------------
def train_rows(compile_rows: bool = True) -> list[dict]:
    """The training rows in running order: without compile first, compile last (the slow ones)."""
    rows = []
    for comp in (False, True) if compile_rows else (False,):
        for ckpt in (False, True):
            for config in CONFIGS:
                for loop in ("plain", "engine"):
                    name = f"{config}/{loop}/ckpt={'on' if ckpt else 'off'}/compile={'on' if comp else 'off'}"
                    rows.append({"name": name, "kind": "train", "config": config, "loop": loop,
                                 "checkpointing": ckpt, "compile": comp})
    return rows


def all_rows(compile_rows: bool = True) -> list[dict]:
    rows = train_rows(compile_rows)
    first_compile = next((i for i, r in enumerate(rows) if r["compile"]), len(rows))
    return rows[:first_compile] + [{"name": "store", "kind": "store"}] + rows[first_compile:]


def make_config(config: str, tiny: bool, run_dir: Path, steps: int, extra: list[str] = ()):
    """The row's PretrainConfig: the paper's YAML, its overrides (``--tiny`` shrinks it), one device, no files."""
    from subfore.config import load_config

    sets = [f"run_dir={run_dir}", "data.train=unused", "data.cache_dir=null", "data.num_workers=0",
            f"train.max_steps={steps}", "train.progress_bar=false", "train.devices=1", "probe=null"]
    sets += MAE if config == "mae" else []
    sets += TINY[config] if tiny else []
    return load_config(ROOT / CONFIGS[config], sets + list(extra))


# --- the worker: runs rows in this process -------------------------------------------------------------------
CHECKPOINT_CALLS = [0]


def count_checkpoints() -> None:
    """Count the calls of torch.utils.checkpoint.checkpoint (eager ones: under torch.compile the count is not kept).

    Installed before subfore and MONAI are imported, so that ``from torch.utils.checkpoint import checkpoint``
    binds the counting function too.
    """
    import functools

    import torch
    import torch.utils.checkpoint as tuc

    original = tuc.checkpoint

    @functools.wraps(original)
    def counted(*args, **kwargs):
        if not torch.compiler.is_compiling():
            CHECKPOINT_CALLS[0] += 1
        return original(*args, **kwargs)

    tuc.checkpoint = counted


def platform_info() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name() if cuda else
            f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "python": platform.python_version(),
            "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None}


def run_train(row: dict, args, run_dir: Path) -> dict:
    """One training row: build, ``args.warmup`` steps, ``args.steps`` timed steps; figures and what ran."""
    import torch
    import torch._dynamo
    from _common import engine_fit, peak_since_reset, phantom_crops, plain_loop, reset_peak

    from subfore.engine.compile import compile_network
    from subfore.engine.run import MetricsWriter, make_trainer, resolve_precision
    from subfore.pretrain import MaskedImageModel

    total = args.warmup + args.steps
    cfg = make_config(row["config"], args.tiny, run_dir, total,
                      [f"model.checkpointing={str(row['checkpointing']).lower()}",
                       f"train.compile={str(row['compile']).lower()}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t = cfg.train
    precision = resolve_precision(t.precision, t.accelerator)
    data = phantom_crops(t.batch_size * total, cfg.data.roi[0])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    reset_peak(device)
    # What an earlier row in this process left allocated (it would count in this row's peaks): should be ~0.
    left = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
    CHECKPOINT_CALLS[0] = 0
    if row["loop"] == "plain":
        torch.backends.cudnn.benchmark = device.type == "cuda"  # as the engine's Trainer sets it
        r = plain_loop(cfg, data, args.warmup, args.steps, device, precision=precision, compile=t.compile,
                       peak_of_timed=True)
    else:
        def trainer(callbacks):
            return make_trainer(run_dir, t, callbacks + [MetricsWriter(run_dir)], validate=False)

        module = MaskedImageModel(cfg)
        compile_network(module.net, t.compile)  # as pretrain() does
        r = engine_fit(module, data, t.batch_size, args.warmup, args.steps, device, trainer, peak_of_timed=True)
    r.update(peak_since_reset(device), allocated_at_row_start_mb=left)
    r.update(precision=precision, batch=t.batch_size, roi=list(cfg.data.roi), model=cfg.model.name,
             steps_asked=args.steps, warmup=args.warmup,
             graphs_compiled=int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
             checkpoint_calls_per_step=None if row["compile"] else CHECKPOINT_CALLS[0] / max(1, r["steps_total"]))
    return r


def run_store(args, run_dir: Path) -> dict:
    """Pretraining's training loader over a crop store built from local phantoms, feeding crops to the device."""
    from types import SimpleNamespace

    import torch
    from _common import sync

    from subfore.data.phantoms import PhantomSpec, write_phantoms
    from subfore.engine.sampling import check_fill, train_loader
    from subfore.pretrain.data import crop_volumes, resolve

    s = STORE["tiny" if args.tiny else "full"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    spec = PhantomSpec(spacing=(s["spacing"],) * 3)
    dataset = write_phantoms(run_dir / "phantoms", n=s["phantoms"], seed=0, spec=spec)
    phantom_s = time.perf_counter() - t0
    extra = [f"data.train={dataset}", f"data.cache_dir={run_dir / 'cache'}"]
    if args.tiny:
        extra += [f"data.spacing=[{s['spacing']},{s['spacing']},{s['spacing']}]"]
    cfg = make_config("subfore", args.tiny, run_dir, 1, extra)
    if "num_workers" in s:
        cfg.data.num_workers = s["num_workers"]
    else:  # the paper config's workers; the YAML's value was set aside for the training rows
        from subfore.config import load_config

        cfg.data.num_workers = load_config(ROOT / CONFIGS["subfore"], ["data.train=unused"]).data.num_workers
    d, t = cfg.data, cfg.train
    plan = resolve(cfg)
    t0 = time.perf_counter()
    volumes = crop_volumes(plan, plan.train_items, d.samples_per_volume)
    build_s = time.perf_counter() - t0
    per_batch = check_fill(len(volumes), t.batch_size, d.samples_per_volume, 1, str(dataset))
    trainer = SimpleNamespace(accumulate_grad_batches=1, global_rank=0, world_size=1, global_step=0)
    loader = train_loader(volumes, cfg.seed, per_batch, trainer, d.num_workers)
    it = iter(loader)
    shape = None
    try:
        for _ in range(max(2, 2 * d.num_workers)):  # workers started and their queues full
            next(it)["image"].to(device)
        sync(device)
        crops = 0
        t0 = time.perf_counter()
        for _ in range(s["batches"]):
            x = next(it)["image"].to(device, non_blocking=True)
            crops += x.shape[0]
            shape = list(x.shape)
        sync(device)
        elapsed = time.perf_counter() - t0
    finally:
        del it  # stops the loader's workers
    return {"crops_per_s": crops / elapsed, "crops": crops, "batch_shape": shape, "num_workers": d.num_workers,
            "volumes": len(volumes), "store_build_s": build_s, "phantoms_s": phantom_s,
            "phantom_spacing_mm": s["spacing"], "pin_memory": device.type == "cuda"}


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def worker(args) -> None:
    """Run ``args.worker`` rows (names) one after another; one result line each on stdout."""
    count_checkpoints()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    if args.tiny:
        torch.set_num_threads(1)  # tiny ops on a small, often shared, CPU: threads only wait for each other
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = {r["name"]: r for r in all_rows()}
    emit = lambda kind, body: print(MARK + json.dumps({"kind": kind, **body}), flush=True)  # noqa: E731
    emit("platform", platform_info())
    # Inside the parent's scratch folder (args.run_dir), which the parent removes even if this process is killed.
    base = Path(tempfile.mkdtemp(prefix="worker-", dir=args.run_dir))
    try:
        for i, name in enumerate(args.worker.split(",")):
            row = rows[name]
            emit("start", {"name": name})
            t0 = time.perf_counter()
            try:
                if not (args.tiny or torch.cuda.is_available()):
                    raise RuntimeError("no CUDA GPU here (the paper configs take minutes a step on a CPU); "
                                       "--tiny runs the CPU smoke version")
                run_dir = base / f"row{i}"
                result = run_train(row, args, run_dir) if row["kind"] == "train" else run_store(args, run_dir)
                result["status"] = "ok"
            except Exception as exc:  # the row fails, the table goes on
                result = {"status": "failed", "reason": one_line(exc)}
            result["wall_s"] = time.perf_counter() - t0
            emit("row", {"name": name, **result})
            import gc

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- the parent: workers, budget, table ------------------------------------------------------------------------
class Worker:
    """A worker process running some rows; its result lines arrive on ``events``, its stderr tail is kept."""

    def __init__(self, names: list[str], args) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", ",".join(names),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--run-dir", args.run_dir]
        cmd += ["--tiny"] if args.tiny else []
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        self.events: queue.Queue = queue.Queue()
        self.stderr: collections.deque = collections.deque(maxlen=40)
        threading.Thread(target=self._read_stdout, daemon=True).start()
        self._err = threading.Thread(target=self._read_stderr, args=(args.verbose,), daemon=True)
        self._err.start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            at = line.find(MARK)  # after any partial line another writer left unterminated
            if at >= 0:
                self.events.put(json.loads(line[at + len(MARK):]))
        self.events.put(None)  # the worker's stdout closed: it ended

    def _read_stderr(self, verbose: bool) -> None:
        for line in self.proc.stderr:
            if verbose:
                sys.stderr.write(line)
            if line.strip():
                self.stderr.append(line.rstrip())

    def reason(self) -> str:
        """Why the worker ended without a row's result: its exit status and its last stderr line."""
        self._err.join(timeout=5)
        code = self.proc.poll()
        last = next((line for line in reversed(self.stderr) if not line.startswith(" ")), "")
        what = f"the row's process died with signal {-code}" if code is not None and code < 0 else \
            f"the row's process exited with status {code}"
        return f"{what}: {last}"[:300] if last else what

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the worker and its loader workers
        except ProcessLookupError:
            pass
        self.proc.wait()


def run_rows(rows: list[dict], args, deadline: float, log) -> tuple[dict, dict]:
    """Run every row in worker processes (``args.rows_per_process`` rows each) within ``deadline``; returns the
    results by name and the platform a worker reported."""
    results: dict[str, dict] = {}
    info: dict = {}
    pending = []
    for r in rows:
        if args.tiny and r.get("compile") and not args.compile:
            results[r["name"]] = {"status": "skipped", "reason": "--tiny leaves compile out (a compile row took "
                                  "4.5 min and more on 2 CPU cores); add --compile"}
        else:
            pending.append(r["name"])
    limits = {r["name"]: args.row_timeout_s * (2 if r.get("compile") else 1) for r in rows}
    while pending:
        if deadline - time.monotonic() < args.min_row_s:
            for name in pending:
                results[name] = {"status": "skipped", "reason": f"the {args.budget_s:.0f} s budget (--budget-s) was "
                                                                 f"spent before it started"}
            break
        group = pending[: args.rows_per_process]
        w = Worker(group, args)
        current, started = None, time.monotonic()
        while True:
            limit = min(deadline, started + limits[current]) if current else deadline
            try:
                event = w.events.get(timeout=max(0.1, limit - time.monotonic()))
            except queue.Empty:
                w.kill()
                if current:
                    wall = time.monotonic() - started
                    if limit == deadline:  # not the row's fault: it had less than its time
                        results[current] = {"status": "skipped", "reason": f"stopped after {wall:.0f} s when the "
                                            f"{args.budget_s:.0f} s budget (--budget-s) ran out", "wall_s": wall}
                    else:
                        results[current] = {"status": "failed", "reason": f"stopped after {wall:.0f} s "
                                            f"(--row-timeout-s)", "wall_s": wall}
                    pending.remove(current)
                    log(f"{current}: {summary(results[current])}")
                break
            if event is None:  # the worker ended
                w.proc.wait()
                if current:
                    results[current] = {"status": "failed", "reason": w.reason(), "wall_s": time.monotonic() - started}
                    pending.remove(current)
                    log(f"{current}: failed ({results[current]['reason']})")
                elif any(n in pending for n in group):  # died before its first row
                    for name in group:
                        results[name] = {"status": "failed", "reason": w.reason()}
                        pending.remove(name)
                break
            kind = event.pop("kind")
            if kind == "platform":
                info = info or event
            elif kind == "start":
                current, started = event["name"], time.monotonic()
            elif kind == "row":
                name = event.pop("name")
                results[name] = check_steps(event, args)
                pending.remove(name)
                current = None
                log(f"{name}: {summary(results[name])}")
    return results, info


def check_steps(r: dict, args) -> dict:
    """A training row that took other than the optimiser steps asked for did not measure what it says: failed."""
    if r.get("status") == "ok" and "steps_timed" in r:
        want = (args.steps, args.warmup + args.steps)
        got = (r["steps_timed"], r["steps_total"])
        if got != want:
            r["status"] = "failed"
            r["reason"] = f"took {got[0]} timed / {got[1]} optimiser steps in all, asked {want[0]} / {want[1]}"
    return r


def summary(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']}: {r.get('reason', '')}"
    if "crops_per_s" in r:
        return f"{r['crops_per_s']:.1f} crops/s"
    return f"{r['samples_per_s']:.3f} samples/s, {r['peak_mem_mb']:.0f} MB, {r['wall_s']:.0f} s"


def fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def table(rows: list[dict], results: dict, info: dict, args) -> str:
    train = [r for r in rows if r["kind"] == "train"]
    kinds = {results[r["name"]].get("mem_kind") for r in train if results[r["name"]]["status"] == "ok"}
    mem = (kinds.pop() if len(kinds) == 1 else "peak memory")
    smoke = " (--tiny: a CPU smoke run, not a benchmark)" if args.tiny else ""
    lines = [f"# GPU check{smoke}: {info.get('device', '?')}"
             f"; torch {info.get('torch', '?')}, CUDA {info.get('cuda') or '–'}; {args.warmup} warm-up + "
             f"{args.steps} timed steps per row",
             "",
             f"| config | loop | checkpointing | compile | samples/s | s/step | {mem} MB, timed steps | "
             f"the same, warm-up | optimiser steps (timed/all) | checkpoint calls/step | graphs compiled | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in train:
        r = results[row["name"]]
        head = f"| {row['config']} | {row['loop']} | {'on' if row['checkpointing'] else 'off'} | " \
               f"{'on' if row['compile'] else 'off'} |"
        if r["status"] == "ok":
            lines.append(f"{head} {r['samples_per_s']:.3f} | {r['step_s']:.3f} | {r['peak_mem_mb']:.0f} | "
                         f"{fmt(r['peak_warmup_mb'], '.0f')} | {r['steps_timed']}/{r['steps_total']} | "
                         f"{fmt(r['checkpoint_calls_per_step'], '.1f')} | {r['graphs_compiled']} | ok |")
        else:
            lines.append(f"{head} – | – | – | – | – | – | – | {r['status']}: {r.get('reason', '')} |")
    lines += ["", "| config | checkpointing | compile | engine / plain samples/s | engine / plain peak memory |",
              "|---|---|---|---|---|"]
    for row in train:
        if row["loop"] != "engine":
            continue
        e, p = results[row["name"]], results.get(row["name"].replace("/engine/", "/plain/"), {"status": "not run"})
        head = f"| {row['config']} | {'on' if row['checkpointing'] else 'off'} | {'on' if row['compile'] else 'off'} |"
        if e["status"] == p["status"] == "ok":
            lines.append(f"{head} {e['samples_per_s'] / p['samples_per_s']:.3f} | "
                         f"{e['peak_mem_mb'] / p['peak_mem_mb']:.3f} |")
        else:
            lines.append(f"{head} – | – |")
    if "store" in results:
        s = results["store"]
        lines += ["", "| crop store → device | crops/s | batch | loader workers | volumes | store build s | "
                  "vs fastest training row |", "|---|---|---|---|---|---|---|"]
        if s["status"] == "ok":
            best = max((results[r["name"]]["samples_per_s"] for r in train if results[r["name"]]["status"] == "ok"),
                       default=None)
            vs = f"{s['crops_per_s'] / best:.1f}× its {best:.2f} samples/s" if best else "–"
            lines.append(f"| pretraining's loader | {s['crops_per_s']:.1f} | {s['batch_shape']} | {s['num_workers']} | "
                         f"{s['volumes']} | {s['store_build_s']:.1f} | {vs} |")
        else:
            lines.append(f"| pretraining's loader | – | – | – | – | – | {s['status']}: {s.get('reason', '')} "
                         f"|")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (seconds): the CI smoke run")
    p.add_argument("--out", help="also write the figures and the platform as JSON here")
    p.add_argument("--warmup", type=int, help="warm-up steps per row (default 3; --tiny 1)")
    p.add_argument("--steps", type=int, help="timed steps per row (default 5; --tiny 2)")
    p.add_argument("--budget-s", type=float, default=290.0, help="rows that would start after this many seconds "
                   "are skipped, a running one is stopped (default 290)")
    p.add_argument("--row-timeout-s", type=float, default=150.0, help="a row running longer fails (compile rows: "
                   "twice this)")
    p.add_argument("--rows", help="only rows whose name contains one of these comma-separated words, e.g. "
                   "'subfore/,store' (names: CONFIG/LOOP/ckpt=on|off/compile=on|off, store)")
    p.add_argument("--no-compile", action="store_true", help="leave out the train.compile rows")
    p.add_argument("--compile", action="store_true", help="--tiny: run the train.compile rows too (minutes)")
    p.add_argument("--rows-per-process", type=int, help="rows per worker process (default: all in one; a row "
                   "that kills its process fails alone, the rest go on in a new one)")
    p.add_argument("--run-dir", default=tempfile.gettempdir(), help="where the scratch folder goes (removed at "
                   "the end)")
    p.add_argument("--verbose", action="store_true", help="pass the workers' stderr through")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--min-row-s", type=float, default=10.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 5)
    if args.warmup < 0 or args.steps < 1:
        p.error("--warmup must be ≥ 0 and --steps ≥ 1")
    if args.worker:
        worker(args)
        return
    t_start = time.monotonic()
    rows = all_rows(not args.no_compile)
    if args.rows:
        words = [w for w in args.rows.split(",") if w]
        rows = [r for r in rows if any(w in r["name"] for w in words)]
        if not rows:
            p.error(f"--rows {args.rows}: matches no row")
    args.rows_per_process = args.rows_per_process or len(rows)
    log = lambda msg: print(f"[{time.monotonic() - t_start:5.0f} s] {msg}", file=sys.stderr, flush=True)  # noqa
    scratch = tempfile.mkdtemp(prefix="subfore-gpu-check-", dir=args.run_dir)
    args.run_dir = scratch  # the workers' rows write their run folders, phantoms and store in here
    try:
        results, info = run_rows(rows, args, t_start + args.budget_s, log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(table(rows, results, info, args))
    if args.out:
        out = {"platform": info, "settings": {"tiny": args.tiny, "warmup": args.warmup, "steps": args.steps,
                                              "budget_s": args.budget_s, "configs": CONFIGS, "mae_overrides": MAE,
                                              "tiny_overrides": TINY if args.tiny else None},
               "rows": [{**row, **results[row["name"]]} for row in rows],
               "wall_s": time.monotonic() - t_start, "date": time.strftime("%Y-%m-%d")}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    failed = [n for n, r in results.items() if r["status"] == "failed"]
    skipped = [n for n, r in results.items() if r["status"] == "skipped"]
    if skipped:
        print(f"\n{len(skipped)} of {len(rows)} rows skipped (the table says why): {', '.join(skipped)}",
              file=sys.stderr)
    if failed:
        print(f"\n{len(failed)} of {len(rows)} rows failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
