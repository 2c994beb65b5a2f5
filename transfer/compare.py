"""``transfer compare``: train a matrix of baselines and fine-tuned backbones on one split, rank them, pick winners."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from transfer import rundir
from transfer.errors import UserError, closest

REPORT_FILES = ("leaderboard.md", "leaderboard.csv", "leaderboard.json", "winners.json", "report.html")
PLOTS = ("accuracy_vs_latency.png", "accuracy_vs_size.png", "learning_curves.png", "accuracy_bars.png")

# ----------------------------------------------------------------------------------------------
# The matrix: config schema, cells
# ----------------------------------------------------------------------------------------------

_NUM = (int, float)
# section -> key -> accepted TOML types; the keys double as the CLI flag destinations (except augment.preset,
# augment.flip and train.tensorboard, mapped in _apply_section).
SCHEMA: dict[str, dict[str, tuple]] = {
    "data": {"dataset": (str,), "data_dir": (str,), "val_split": _NUM, "test_split": _NUM,
             "folder_image_size": (int,), "synthetic_train": (int,), "synthetic_test": (int,), "limit_train": (int,)},
    "augment": {"preset": (str,), "flip": (bool,), "rotation": _NUM, "zoom": _NUM, "shift": _NUM,
                "contrast": _NUM, "brightness": _NUM},
    "train": {"optimizer": (str,), "lr": _NUM, "fine_tune_lr": _NUM, "schedule": (str,), "label_smoothing": _NUM,
              "batch_size": (int,), "epochs": (int,), "head_epochs": (int,), "patience": (int,), "seed": (int,),
              "tensorboard": (bool,)},
    "matrix": {"baselines": (list,), "backbones": (list,), "unfreeze": (list,), "image_sizes": (list,),
               "weights": (str,), "head": (str,)},
    "cells": {"name": (str,), "baseline": (str,), "backbone": (str,), "image_size": (int,), "unfreeze": (str, int),
              "weights": (str,), "head": (str,)},
}
TOP_LEVEL: dict[str, tuple] = {"name": (str,), "seeds": (int,), "weights": (str,), "head": (str,),
                               "artifacts": (str,), "latency_runs": (int,)}
_TABLES = ("data", "augment", "train")  # plain tables; "matrix" is a table or an array of tables, "cells" an array


@dataclass(frozen=True)
class Cell:
    """One model of the matrix: a baseline, or a backbone at an image size and unfreeze setting."""

    name: str
    kind: str  # baseline | finetune
    model: str  # baseline name or backbone name
    image_size: int | None = None
    unfreeze: str = "0"
    weights: str = "imagenet"
    head: str = "default"


def _type_name(types: tuple) -> str:
    return " or ".join({int: "integer", float: "number", str: "string", bool: "true/false", list: "list"}[t]
                       for t in types)


def _check_keys(table: dict, allowed: dict[str, tuple], where: str) -> None:
    """Unknown keys (with the closest match) and wrongly typed values are one-line errors."""
    for key, value in table.items():
        if key not in allowed:
            guess = closest(key, allowed)
            hint = f"; did you mean '{where}{guess}'?" if guess else ""
            raise UserError(f"unknown config key '{where}{key}'{hint} (valid: {', '.join(sorted(allowed))})")
        types = allowed[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise UserError(f"config key '{where}{key}' = {value!r} must be of type {_type_name(types)}")


def load_config(path: str | os.PathLike) -> dict:
    """Read and validate a compare TOML file; every mistake is a one-line :class:`UserError`."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist; pass --config PATH to a TOML file")
    try:
        with open(path, "rb") as handle:
            config = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file '{path}' is not valid TOML: {exc}") from exc
    allowed = {**TOP_LEVEL, **{s: (dict,) for s in _TABLES}, "matrix": (dict, list), "cells": (list,)}
    _check_keys(config, allowed, "")
    for section in _TABLES:
        _check_keys(config.get(section, {}), SCHEMA[section], f"{section}.")
    matrices = config.get("matrix", [])
    config["matrix"] = [matrices] if isinstance(matrices, dict) else matrices
    for kind in ("matrix", "cells"):
        for i, table in enumerate(config.get(kind, [])):
            if not isinstance(table, dict):
                raise UserError(f"config '{kind}' must be a table or [[{kind}]] tables, got {table!r}")
            _check_keys(table, SCHEMA[kind], f"{kind}[{i}].")
    return config


def _listed(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _finetune_cell(backbone: str, size, unfreeze, weights: str, head: str, name: str | None = None) -> Cell:
    from transfer.backbones import get_backbone
    from transfer.freezing import parse_unfreeze

    spec = get_backbone(backbone)
    size = int(size) if size not in (None, "") else spec.default_size
    unfreeze = parse_unfreeze(unfreeze).text
    name = name or f"{spec.name}-{size}px-u{unfreeze}" + ("" if weights == "imagenet" else f"-{rundir.slug(weights)}")
    return Cell(name, "finetune", spec.name, size, unfreeze, weights, head)


def expand_matrix(matrices: list[dict], cells: list[dict], *, weights: str, head: str) -> list[Cell]:
    """Cells of every matrix (baselines, and backbones x image sizes x unfreeze) plus explicit cells.

    Unknown model names (closest match) and duplicate cell names are one-line errors.
    """
    from transfer.baselines import get_baseline

    out: list[Cell] = []
    for m in matrices:
        m_weights, m_head = m.get("weights", weights), m.get("head", head)
        for name in m.get("baselines", []):
            out.append(Cell(get_baseline(str(name)).name, "baseline", str(name), weights="none"))
        for backbone in m.get("backbones", []):
            for size in m.get("image_sizes") or [None]:
                for unfreeze in m.get("unfreeze") or ["0"]:
                    out.append(_finetune_cell(str(backbone), size, unfreeze, m_weights, m_head))
    for c in cells:
        if ("baseline" in c) == ("backbone" in c):
            raise UserError(f"config cell {c!r} needs exactly one of 'baseline' or 'backbone'")
        if "baseline" in c:
            row = get_baseline(c["baseline"])
            out.append(Cell(c.get("name", row.name), "baseline", row.name, weights="none"))
        else:
            out.append(_finetune_cell(c["backbone"], c.get("image_size"), c.get("unfreeze", "0"),
                                      c.get("weights", weights), c.get("head", head), c.get("name")))
    if not out:
        raise UserError("the comparison has no cells; pass --baselines and/or --backbones, or --config FILE")
    seen: set[str] = set()
    for cell in out:
        if cell.name in seen:
            raise UserError(f"duplicate cell name '{cell.name}' in the comparison; give each cell a unique name")
        seen.add(cell.name)
    return out


# ----------------------------------------------------------------------------------------------
# Ranking and winners: pure functions
# ----------------------------------------------------------------------------------------------


def competition_rank(values: list[float]) -> list[int]:
    """Rank (1 = best) where higher is better; ties share the better rank ("1224" ranking)."""
    return [1 + sum(other > value for other in values) for value in values]


def pareto_front(accuracy: list[float], cost: list[float]) -> list[int]:
    """Indices of points no other point dominates (accuracy at least as high and cost at least as low,
    one of them strictly), in input order."""
    front = []
    for i, (a, c) in enumerate(zip(accuracy, cost, strict=True)):
        dominated = any(
            (a2 >= a and c2 <= c) and (a2 > a or c2 < c)
            for j, (a2, c2) in enumerate(zip(accuracy, cost, strict=True)) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def pick_winners(rows: list[dict]) -> list[dict]:
    """The most accurate cells and the Pareto-optimal ones on accuracy vs latency and vs size, with reasons."""
    acc = [r["test_accuracy"] for r in rows]
    reasons: dict[int, list[str]] = {}
    for i, r in enumerate(rows):
        if r["rank"] == 1:
            reasons.setdefault(i, []).append("most accurate")
    for i in pareto_front(acc, [r["latency_ms"] for r in rows]):
        reasons.setdefault(i, []).append("pareto: accuracy vs latency")
    for i in pareto_front(acc, [r["size_bytes"] for r in rows]):
        reasons.setdefault(i, []).append("pareto: accuracy vs size")
    return [{"cell": rows[i]["cell"], "why": why, "test_accuracy": rows[i]["test_accuracy"],
             "latency_ms": rows[i]["latency_ms"], "size_bytes": rows[i]["size_bytes"],
             "best_run": rows[i]["best_run"], "run_dirs": rows[i]["run_dirs"]}
            for i, why in sorted(reasons.items(), key=lambda item: rows[item[0]]["rank"])]


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


def measure_latency(model_path: Path, shape: list[int], runs: int = 30, warmup: int = 5) -> float:
    """Median milliseconds of ``model(x)`` on one native-size image after ``warmup`` calls.

    The call is traced once (``tf.function``), as SavedModel/serving run it: eager dispatch would otherwise add a
    per-layer overhead that punishes deep models for something no deployment pays.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    import transfer.layers  # noqa: F401  (registers the custom layers for loading)

    model = keras.models.load_model(model_path, compile=False)
    call = tf.function(lambda t: model(t, training=False))
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (1, *shape)).astype("float32"))
    for _ in range(max(warmup, 1)):
        call(x).numpy()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call(x).numpy()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def collect_row(cell: Cell, run_paths: list[Path], latency_runs: int) -> dict:
    """A leaderboard row from the runs' own manifest.json and evaluation.json (seeds aggregated)."""
    manifests = [rundir.load_complete(p) for p in run_paths]
    evaluations = [rundir.read_json(p / rundir.EVALUATION) for p in run_paths]
    accuracy, accuracy_std = mean_std([e["accuracy"] for e in evaluations])
    top5 = [e.get("top5_accuracy") for e in evaluations]
    top5_mean, top5_std = mean_std(top5) if None not in top5 else (None, None)
    first = manifests[0]
    best = max(range(len(run_paths)), key=lambda i: evaluations[i]["accuracy"])
    return {
        "cell": cell.name,
        "kind": cell.kind,
        "model": cell.model,
        "image_size": first["model"].get("image_size"),
        "unfreeze": first["model"].get("unfreeze"),
        "augment": first["config"]["augment"],
        "seeds": [m["config"]["train"]["seed"] for m in manifests],
        "test_accuracy": accuracy,
        "test_accuracy_std": accuracy_std,
        "test_accuracies": [e["accuracy"] for e in evaluations],
        "top5_accuracy": top5_mean,
        "top5_accuracy_std": top5_std,
        "params": first["model"]["params"],
        "trainable_params": first["model"]["trainable_params"],
        "size_bytes": first["model"]["size_bytes"],
        "train_seconds": statistics.fmean(m["timings"]["train_seconds"] for m in manifests),
        "epochs_run": [m["metrics"]["epochs_run"] for m in manifests],
        "latency_ms": measure_latency(run_paths[0] / rundir.MODEL, first["input"]["shape"], latency_runs),
        "run_dirs": [str(p) for p in run_paths],
        "best_run": str(run_paths[best]),
        "fingerprint": first["dataset"]["fingerprint"],
        "history": str(run_paths[0] / rundir.HISTORY),
    }


def check_same_data(manifests: dict[str, dict], expected: str | None = None) -> str:
    """All runs must come from one dataset split (same fingerprint); returns that fingerprint."""
    fingerprints = {}
    for name, manifest in manifests.items():
        fingerprints.setdefault(manifest["dataset"]["fingerprint"], []).append(name)
    if expected is not None:
        fingerprints.setdefault(expected, [])
    if len(fingerprints) > 1:
        odd = next(names for fp, names in fingerprints.items() if fp != (expected or next(iter(fingerprints))))
        raise UserError(
            f"run '{odd[0]}' was trained on a different dataset or split than the others (dataset fingerprint "
            "differs); compare runs of one split only: pass --overwrite to retrain or --name NEW for a new report"
        )
    return next(iter(fingerprints))


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def _flag_defaults() -> dict:
    """Defaults of the shared data/training flags, as ``transfer finetune`` has them."""
    from transfer.cli import add_data_args, add_train_args

    parser = argparse.ArgumentParser(add_help=False)
    add_data_args(parser)
    add_train_args(parser)
    defaults = vars(parser.parse_args([]))
    defaults["augment"] = "none"  # fair by default: only baselines whose identity is augmentation augment
    return defaults


def _run_defaults() -> dict:
    """Defaults of the run-directory flags (every cell gets its own name; other options keep finetune's default)."""
    from transfer.cli import add_run_args

    parser = argparse.ArgumentParser(add_help=False)
    add_run_args(parser)
    return vars(parser.parse_args([]))


def register(subparsers) -> None:
    """Add the ``compare`` sub-command."""
    from transfer.cli import add_data_args, add_train_args
    from transfer.distribute import STRATEGIES

    p = subparsers.add_parser(
        "compare", help="train a matrix of baselines and backbones on one split; leaderboard, plots, winners",
        description="Every cell trains on the same split with the same seeds and epoch budget; complete cells are "
        "not retrained. Settings: flags override --config, which overrides the defaults. Baselines named -aug "
        "keep their own augmentation; every other cell uses the shared one (default none).",
    )
    m = p.add_argument_group("matrix")
    m.add_argument("--config", help="TOML file with the matrix and settings (see configs/)")
    m.add_argument("--baselines", help="comma-separated baseline names (see `transfer baselines`)")
    m.add_argument("--backbones", help="comma-separated backbone names (see `transfer backbones`)")
    m.add_argument("--unfreeze", help="comma-separated unfreeze settings for every backbone, e.g. 0,4,all")
    m.add_argument("--image-sizes", help="comma-separated image sizes for every backbone (default: its own)")
    m.add_argument("--weights", help="backbone weights: imagenet | none | PATH (default imagenet)")
    m.add_argument("--head", help="head of every fine-tuned cell (default: default)")
    m.add_argument("--seeds", type=int, help="repeat every cell with this many seeds (--seed, --seed+1, ...)")
    r = p.add_argument_group("report")
    r.add_argument("--name", help="report name: artifacts/reports/<name>/ (default: the config's name or 'compare')")
    r.add_argument("--artifacts", help="artifacts root (default: artifacts)")
    r.add_argument("--overwrite", action="store_true", help="retrain every cell of this report")
    r.add_argument("--latency-runs", type=int, help="timed batch-1 calls per model (median reported; default 30)")
    r.add_argument("--export-winners", action="store_true", help="export the winners with the export package")
    r.add_argument("--strategy", default="auto", choices=STRATEGIES,
                   help="tf.distribute strategy of every cell: auto | one-device | mirrored | multi-worker")
    add_data_args(p)
    add_train_args(p)
    p.set_defaults(func=cmd_compare, **{key: None for key in _flag_defaults()})


def _apply_section(ns: argparse.Namespace, section: str, table: dict) -> None:
    for key, value in table.items():
        if section == "augment" and key == "preset":
            ns.augment = value
        elif section == "augment" and key == "flip":
            ns.flip = "on" if value else "off"
        elif section == "train" and key == "tensorboard":
            ns.no_tensorboard = not value
        else:
            setattr(ns, key, value)


def resolve_settings(args) -> tuple[argparse.Namespace, list[Cell], dict]:
    """Defaults, then the config file, then explicit flags: the shared settings namespace, the cells, the rest."""
    defaults = _flag_defaults()
    config = load_config(args.config) if args.config else {}
    matrix_flags = [args.baselines, args.backbones, args.unfreeze, args.image_sizes]
    if config and any(flag is not None for flag in matrix_flags):
        raise UserError("pass the matrix either in --config or as --baselines/--backbones/--unfreeze/--image-sizes")
    ns = argparse.Namespace(**_run_defaults(), **defaults)
    for section in _TABLES:
        _apply_section(ns, section, config.get(section, {}))
    for key in defaults:
        if getattr(args, key, None) is not None:
            setattr(ns, key, getattr(args, key))
    top = {"name": "compare", "seeds": 1, "weights": "imagenet", "head": "default", "artifacts": "artifacts",
           "latency_runs": 30}
    top.update({k: v for k, v in config.items() if k in TOP_LEVEL})
    top.update({k: getattr(args, k) for k in TOP_LEVEL if getattr(args, k, None) is not None})
    if top["seeds"] < 1 or top["latency_runs"] < 1:
        raise UserError(f"--seeds {top['seeds']} and --latency-runs {top['latency_runs']} must be >= 1")
    if args.config:
        matrices, cells = config.get("matrix", []), config.get("cells", [])
    else:
        sizes = [int(s) if s.isdecimal() else s for s in _listed(args.image_sizes)]
        for size in sizes:
            if not isinstance(size, int):
                raise UserError(f"--image-sizes '{size}' is not a whole number of pixels")
        matrices = [{"baselines": _listed(args.baselines), "backbones": _listed(args.backbones),
                     "unfreeze": _listed(args.unfreeze) or ["0"], "image_sizes": sizes}]
        cells = []
    if not all(isinstance(v, str | int) for m in matrices for k in ("baselines", "backbones", "unfreeze",
                                                                 "image_sizes") for v in m.get(k, [])):
        raise UserError("config matrix lists must hold names, numbers or 'all'")
    return ns, expand_matrix(matrices, cells, weights=top["weights"], head=top["head"]), top


def _export_entry():
    """The seam to the export package: ``export_run(run_dir) -> export dir``, or a one-line error without it."""
    try:
        from export.exporter import ExportConfig, run_export
    except ImportError as exc:
        raise UserError(f"--export-winners: export is not available yet ({exc}); the winners are listed in "
                        "the report's winners.json") from exc

    def export_run(run_dir: Path) -> Path:
        return run_export(ExportConfig(run_dir=str(run_dir))).out

    return export_run


def _fmt_duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def cmd_compare(args) -> int:
    from transfer.baselines import BaselineConfig, baseline_recipe, get_baseline
    from transfer.cli import shared_configs
    from transfer.config import ModelConfig
    from transfer.recipes import finetune_recipe
    from transfer.runner import RunConfig, execute

    ns, cells, top = resolve_settings(args)
    export_run = _export_entry() if args.export_winners else None
    ns.name, ns.artifacts, ns.overwrite = None, top["artifacts"], args.overwrite
    data_cfg, shared_augment, base_train, _ = shared_configs(ns)
    report = rundir.slug(top["name"])
    seeds = [base_train.seed + i for i in range(top["seeds"])]

    # Every recipe is built (validated) before anything trains: a bad cell fails the whole command up front.
    jobs = []
    for seed in seeds:
        train = dataclasses.replace(base_train, seed=seed)
        for cell in cells:
            if cell.kind == "baseline":
                row = get_baseline(cell.model)
                recipe = baseline_recipe(BaselineConfig(row.name), data_cfg.dataset, seed)
                augment = row.augment or shared_augment
                cell_train = dataclasses.replace(train, head_epochs=0)
            else:
                model_cfg = ModelConfig(backbone=cell.model, weights=cell.weights, image_size=cell.image_size,
                                        head=cell.head, unfreeze=cell.unfreeze)
                recipe, augment, cell_train = finetune_recipe(model_cfg, data_cfg.dataset, seed), shared_augment, train
            run_cfg = RunConfig(artifacts=top["artifacts"], name=f"{report}--{cell.name}--s{seed}",
                                overwrite=args.overwrite, strategy=args.strategy)
            jobs.append((cell, seed, recipe, augment, cell_train, run_cfg))

    from transfer.data import load_dataset

    fingerprint = load_dataset(data_cfg).fingerprint()
    complete = [job[5].run_path("") for job in jobs if rundir.is_complete(job[5].run_path(""))]
    if not args.overwrite:  # refuse before training anything when finished cells were made on other data
        check_same_data({p.name: rundir.read_json(p / rundir.MANIFEST) for p in complete}, expected=fingerprint)

    started, durations = time.perf_counter(), []
    runs: dict[str, list[Path]] = {cell.name: [] for cell in cells}
    for i, (cell, seed, recipe, augment, cell_train, run_cfg) in enumerate(jobs, 1):
        elapsed = time.perf_counter() - started
        eta = (_fmt_duration(statistics.fmean(durations) * (len(jobs) - i + 1)) if durations else "estimating")
        label = cell.name + (f" (seed {seed})" if len(seeds) > 1 else "")
        print(f"\n=== cell {i}/{len(jobs)} {label} — elapsed {_fmt_duration(elapsed)}, "
              f"estimated remaining {eta} ===", flush=True)
        t0 = time.perf_counter()
        runs[cell.name].append(execute(recipe, data_cfg, augment, cell_train, run_cfg))
        durations.append(time.perf_counter() - t0)

    manifests = {p.name: rundir.load_complete(p) for paths in runs.values() for p in paths}
    check_same_data(manifests, expected=fingerprint)
    print(f"\nmeasuring batch-1 latency ({top['latency_runs']} calls per model after warm-up) ...", flush=True)
    rows = [collect_row(cell, runs[cell.name], top["latency_runs"]) for cell in cells]
    for row, rank in zip(rows, competition_rank([r["test_accuracy"] for r in rows]), strict=True):
        row["rank"] = rank
    rows.sort(key=lambda r: (r["rank"], r["latency_ms"]))
    winners = pick_winners(rows)
    settings = {"dataset": data_cfg.dataset, "fingerprint": fingerprint, "seeds": seeds,
                "data": dataclasses.asdict(data_cfg), "shared_augment": dataclasses.asdict(shared_augment),
                "train": dataclasses.asdict(base_train), "latency_runs": top["latency_runs"],
                "config_file": str(args.config) if args.config else None}
    out = write_report(Path(top["artifacts"]) / "reports" / report, report, rows, winners, settings)
    print_table(rows, winners)
    print(f"\nreport: {out / 'report.html'} (leaderboard.md/.csv/.json, winners.json, plots/)")
    if export_run is not None:
        for winner in winners:
            print(f"exporting winner {winner['cell']} ({', '.join(winner['why'])}) ...", flush=True)
            winner["export_dir"] = str(export_run(Path(winner["best_run"])))
        rundir.write_json(out / "winners.json", {**rundir.read_json(out / "winners.json"), "winners": winners})
    return 0


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------

COLUMNS = (  # (key, header)
    ("rank", "rank"), ("cell", "cell"), ("test_accuracy", "test acc"), ("top5_accuracy", "top-5"),
    ("params", "params"), ("trainable_params", "trainable"), ("size_bytes", "size"), ("train_seconds", "train time"),
    ("latency_ms", "latency b=1"),
)


def _cell_text(row: dict, key: str) -> str:
    value = row[key]
    if key in ("test_accuracy", "top5_accuracy"):
        if value is None:
            return "—"
        std = row[f"{key}_std"]
        return f"{value * 100:.2f}%" + (f" ± {std * 100:.2f}" if std is not None else "")
    if key in ("params", "trainable_params"):
        return f"{value:,}"
    if key == "size_bytes":
        return f"{value / 1e6:.2f} MB"
    if key == "train_seconds":
        return f"{value:.1f} s"
    if key == "latency_ms":
        return f"{value:.2f} ms"
    return str(value)


def _markdown(rows: list[dict], winners: list[dict], title: str, settings: dict) -> str:
    lines = [f"# Comparison: {title}", "",
             f"Dataset `{settings['dataset']}` (fingerprint `{settings['fingerprint'][:12]}`), seeds "
             f"{settings['seeds']}, epochs {settings['train']['epochs']}, batch {settings['train']['batch_size']}. "
             "Accuracy is mean ± sample std over seeds; latency is the median of batch-1 calls on one native-size "
             "image.", "",
             "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell_text(r, k) for k, _ in COLUMNS) + " |" for r in rows]
    lines += ["", "## Winners", ""]
    lines += [f"- **{w['cell']}** — {', '.join(w['why'])} (`{w['best_run']}`)" for w in winners]
    return "\n".join(lines) + "\n"


def _plot_tradeoff(plt, rows: list[dict], key: str, label: str, path: Path, scale: float = 1.0) -> None:
    acc = [r["test_accuracy"] * 100 for r in rows]
    cost = [r[key] * scale for r in rows]
    front = sorted(pareto_front(acc, cost), key=lambda i: cost[i])
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter(cost, acc, color="tab:blue", zorder=2, label="cells")
    ax.plot([cost[i] for i in front], [acc[i] for i in front], color="tab:red", marker="o", markersize=9,
            markerfacecolor="none", linewidth=1.5, zorder=3, label="Pareto front")
    for r, x, y in zip(rows, cost, acc, strict=True):
        ax.annotate(r["cell"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy (%)")
    if len(set(cost)) > 1 and min(cost) > 0 and max(cost) / min(cost) > 20:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(rows: list[dict], out: Path) -> list[Path]:
    """Accuracy vs latency and vs size (Pareto front marked), overlaid learning curves, accuracy bars."""
    from transfer.plots import _pyplot
    from transfer.train import read_history

    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    _plot_tradeoff(plt, rows, "latency_ms", "batch-1 latency (ms)", out / PLOTS[0])
    _plot_tradeoff(plt, rows, "size_bytes", "model file size (MB)", out / PLOTS[1], scale=1e-6)

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        history = read_history(Path(r["history"]))
        line, = ax.plot([h["epoch"] for h in history], [h.get("val_accuracy") for h in history], label=r["cell"])
        ax.plot([h["epoch"] for h in history], [h.get("accuracy") for h in history], linestyle=":",
                color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (solid: validation, dotted: train)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOTS[2], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 5))
    means = [r["test_accuracy"] * 100 for r in rows]
    errors = [(r["test_accuracy_std"] or 0) * 100 for r in rows]
    ax.bar(range(len(rows)), means, yerr=errors, capsize=4,
           color=["tab:orange" if r["kind"] == "baseline" else "tab:blue" for r in rows])
    ax.set_xticks(range(len(rows)), [r["cell"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)  (orange: scratch baseline, blue: fine-tuned)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / PLOTS[3], dpi=100)
    plt.close(fig)
    return [out / name for name in PLOTS]


def _html(markdown_rows: list[dict], winners: list[dict], title: str, settings: dict, plots: list[Path]) -> str:
    import base64
    import html

    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell_text(r, k))}</td>" for k, _ in COLUMNS) + "</tr>"
                   for r in markdown_rows)
    wins = "".join(f"<li><b>{html.escape(w['cell'])}</b> — {html.escape(', '.join(w['why']))} "
                   f"(<code>{html.escape(w['best_run'])}</code>)</li>" for w in winners)
    images = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(p.stem.replace('_', ' '))}</figcaption></figure>" for p in plots)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#eee}}
figure{{display:inline-block;margin:1em}}img{{max-width:560px}}</style></head><body>
<h1>Comparison: {html.escape(title)}</h1>
<p>Dataset <code>{html.escape(settings['dataset'])}</code> (fingerprint <code>{settings['fingerprint'][:12]}</code>),
seeds {settings['seeds']}, epochs {settings['train']['epochs']}, batch {settings['train']['batch_size']}.
Accuracy: mean ± sample std over seeds. Latency: median of batch-1 calls on one native-size image.</p>
<table><tr>{head}</tr>{body}</table>
<h2>Winners</h2><ul>{wins}</ul>
<h2>Plots</h2>{images}
</body></html>
"""


# What a compare report consists of; leaderboard.json is swapped in last, so it never describes files not yet written.
REPORT_DIRS = ("plots",)
REPORT_FILES = ("leaderboard.md", "leaderboard.csv", "report.html", "winners.json", "leaderboard.json")


def _swap_in(tmp: Path, out: Path) -> None:
    """Move the report written in ``tmp`` into ``out`` entry by entry (each move atomic), leaving every other file in
    ``out`` (a pipeline's pipeline.html, the user's notes) where it is."""
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_DIRS:
        if (out / name).exists():
            os.replace(out / name, tmp / f".previous-{name}")  # dropped with tmp below
        if (tmp / name).exists():
            os.replace(tmp / name, out / name)
    for name in REPORT_FILES:
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp)


def write_report(out: Path, title: str, rows: list[dict], winners: list[dict], settings: dict) -> Path:
    """Write every report file into a temporary directory, then move them into ``out``, replacing only the files a
    report consists of (REPORT_FILES, REPORT_DIRS)."""
    import csv

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plots = write_plots(rows, tmp / "plots")
        public = [{k: v for k, v in r.items() if k != "history"} for r in rows]
        (tmp / "leaderboard.md").write_text(_markdown(rows, winners, title, settings))
        with open(tmp / "leaderboard.csv", "w", newline="") as handle:
            fields = [k for k in public[0] if k not in ("augment", "run_dirs", "test_accuracies", "seeds",
                                                        "epochs_run")]
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(public)
        created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        rundir.write_json(tmp / "leaderboard.json", {"name": title, "created": created, "settings": settings,
                                                     "rows": public, "winners": winners})
        rundir.write_json(tmp / "winners.json", {"name": title, "created": created, "winners": winners})
        (tmp / "report.html").write_text(_html(rows, winners, title, settings, plots))
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def print_table(rows: list[dict], winners: list[dict]) -> None:
    """A short leaderboard on the terminal."""
    marks = {w["cell"]: "*" for w in winners}
    print(f"\n{'rank':>4}  {'cell':<30}{'test acc':>18}{'latency':>11}{'size':>11}{'params':>13}")
    for r in rows:
        print(f"{r['rank']:>4}  {(r['cell'] + marks.get(r['cell'], '')):<30}{_cell_text(r, 'test_accuracy'):>18}"
              f"{_cell_text(r, 'latency_ms'):>11}{_cell_text(r, 'size_bytes'):>11}{r['params']:>13,}")
    print("* winner (most accurate or Pareto-optimal on accuracy vs latency/size)")
    sys.stdout.flush()

