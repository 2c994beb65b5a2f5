"""``transfer compare``: the command, and :func:`run_compare`, which the pipeline calls with resolved settings."""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from transfer import rundir
from transfer.errors import UserError


def register(subparsers) -> None:
    """Add the ``compare`` sub-command."""
    from transfer.config import CompareConfig, MatrixConfig, RunConfig
    from transfer.options import add_config_args, add_data_args, add_train_args

    p = subparsers.add_parser(
        "compare", help="train a matrix of baselines and backbones on one split; leaderboard, plots, winners",
        description="Every cell trains on the same split with the same seeds and epoch budget; complete cells are "
        "not retrained. Settings: flags override --config, which overrides the defaults. Baselines named -aug "
        "keep their own augmentation; every other cell uses the shared one (default none).",
    )
    m = p.add_argument_group("matrix")
    m.add_argument("--config", help="TOML file with the matrix and settings (see configs/)")
    add_config_args(m, MatrixConfig, exclude=("weights", "head"), unset=True)
    r = p.add_argument_group("comparison and report")
    add_config_args(r, CompareConfig, unset=True)
    add_config_args(r, RunConfig, exclude=("artifacts", "name"))
    r.add_argument("--export-winners", action="store_true", help="export the winners with the export package")
    r.add_argument("--trust-hub-handle", dest="trust_hub", action="store_true",
                   help="let Hub layers load their modules from recorded handles outside the run directories "
                   "(only runs you trust; docs/security.md)")
    add_data_args(p, unset=True, default_texts={"preset": "none (compare's fair default)"})
    add_train_args(p, unset=True)
    p.set_defaults(func=cmd_compare)


def _export_entry(trust_hub: bool = False):
    """The seam to the export package: ``export_run(run_dir) -> export dir``, or a one-line error without it."""
    try:
        from export.exporter import ExportConfig, run_export
    except ImportError as exc:
        raise UserError(f"--export-winners: export is not available yet ({exc}); the winners are listed in "
                        "the report's winners.json") from exc

    def export_run(run_dir: Path) -> Path:
        return run_export(ExportConfig(run_dir=str(run_dir), trust_hub=trust_hub)).out

    return export_run


def _fmt_duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _remaining(jobs: list, measured: dict[str, float], cells) -> str:
    """Time the jobs still to train will take: a cell's own measured run (another seed), else the mean of the measured
    cells of its kind (scratch baselines and fine-tuned backbones cost very differently), else of all measured cells.
    Runs that were already complete are not measurements."""
    if not jobs:
        return "0:00:00"
    if not measured:
        return "estimating"
    kinds = {c.name: c.kind for c in cells}
    total = 0.0
    for cell, *_ in jobs:
        if cell.name in measured:
            total += measured[cell.name]
            continue
        same_kind = [s for name, s in measured.items() if kinds[name] == cell.kind]
        total += statistics.fmean(same_kind or measured.values())
    return _fmt_duration(total)


@dataclass
class CompareResult:
    """What a finished comparison produced: its report directory, the ranked rows and the winners."""

    report_dir: Path
    rows: list[dict]
    winners: list[dict]
    settings: dict


def cmd_compare(args) -> int:
    from transfer.compare.matrix import load_config, resolve_settings

    config = load_config(args.config) if args.config else None
    settings = resolve_settings(config, args, config_file=args.config)
    export_run = _export_entry(args.trust_hub) if args.export_winners else None
    result = run_compare(settings, trust_hub=args.trust_hub)
    if export_run is not None:
        for winner in result.winners:
            print(f"exporting winner {winner['cell']} ({', '.join(winner['why'])}) ...", flush=True)
            winner["export_dir"] = str(export_run(Path(winner["best_run"])))
        path = result.report_dir / "winners.json"
        rundir.write_json(path, {**rundir.read_json(path), "winners": result.winners})
    return 0


def run_compare(settings, *, trust_hub: bool = False) -> CompareResult:
    """Train every cell of ``settings`` (complete runs are kept), measure, rank, pick winners, write the report."""
    from transfer.baselines import BaselineConfig, baseline_recipe, get_baseline
    from transfer.compare.measure import check_same_data, collect_row
    from transfer.compare.ranking import annotate, competition_rank, metric_key, pick_winners
    from transfer.compare.report import print_table, write_report
    from transfer.config import ModelConfig, RunConfig
    from transfer.data import load_dataset
    from transfer.options import replay_options
    from transfer.recipes import finetune_recipe
    from transfer.runner import execute

    top, data_cfg = settings.top, settings.data
    report = rundir.slug(top.name)
    seeds = [settings.train.seed + i for i in range(top.seeds)]

    # Every recipe is built (validated) before anything trains: a bad cell fails the whole command up front.
    jobs = []
    for seed in seeds:
        train = dataclasses.replace(settings.train, seed=seed)
        for cell in settings.cells:
            if cell.kind == "baseline":
                row = get_baseline(cell.model)
                recipe = baseline_recipe(BaselineConfig(row.name), data_cfg.dataset, seed)
                augment = row.augment or settings.augment
                cell_train = dataclasses.replace(train, head_epochs=0)
            else:
                model_cfg = ModelConfig(backbone=cell.model, weights=cell.weights, image_size=cell.image_size,
                                        head=cell.head, unfreeze=cell.unfreeze)
                recipe = finetune_recipe(model_cfg, data_cfg.dataset, seed)
                augment, cell_train = settings.augment, train
            run_cfg = RunConfig(artifacts=top.artifacts, name=f"{report}--{cell.name}--s{seed}",
                                overwrite=settings.overwrite, strategy=settings.strategy)
            # Every cell writes a config.toml that replays it alone with `transfer finetune|baseline --config`.
            if cell.kind == "baseline":
                command = "baseline"
                options = replay_options(data_cfg, augment, cell_train, run_cfg,
                                         extra={"model": row.name, "protocol": "seeds"})
            else:
                command = "finetune"
                options = replay_options(recipe.model_config, data_cfg, augment, cell_train, run_cfg)
            run_cfg = dataclasses.replace(run_cfg, command=command, options=tuple(sorted(options.items())))
            jobs.append((cell, seed, recipe, augment, cell_train, run_cfg))

    fingerprint = load_dataset(data_cfg).fingerprint()
    complete = [job[5].run_path("") for job in jobs if rundir.is_complete(job[5].run_path(""))]
    if not settings.overwrite:  # refuse before training anything when finished cells were made on other data
        check_same_data({p.name: rundir.read_json(p / rundir.MANIFEST) for p in complete}, expected=fingerprint)

    started = time.perf_counter()
    measured: dict[str, float] = {}  # cell -> seconds one of its (not already complete) runs took
    to_train = {job[5].run_path("") for job in jobs} - set(complete)
    runs: dict[str, list[Path]] = {cell.name: [] for cell in settings.cells}
    for i, (cell, seed, recipe, augment, cell_train, run_cfg) in enumerate(jobs, 1):
        elapsed = time.perf_counter() - started
        eta = _remaining([job for job in jobs[i - 1:] if job[5].run_path("") in to_train], measured, settings.cells)
        label = cell.name + (f" (seed {seed})" if len(seeds) > 1 else "")
        print(f"\n=== cell {i}/{len(jobs)} {label} — elapsed {_fmt_duration(elapsed)}, "
              f"estimated remaining {eta} ===", flush=True)
        t0 = time.perf_counter()
        runs[cell.name].append(execute(recipe, data_cfg, augment, cell_train, run_cfg))
        if run_cfg.run_path("") in to_train:
            measured[cell.name] = time.perf_counter() - t0

    manifests = {p.name: rundir.load_complete(p) for paths in runs.values() for p in paths}
    check_same_data(manifests, expected=fingerprint)
    print(f"\nmeasuring batch-1 latency ({top.latency_runs} calls per model after warm-up) ...", flush=True)
    rows = [collect_row(cell, runs[cell.name], top.latency_runs, trust_hub=trust_hub) for cell in settings.cells]
    for row, rank in zip(rows, competition_rank([r[metric_key(top.rank_by)] for r in rows]), strict=True):
        row["rank"] = rank
    annotate(rows, rank_by=top.rank_by)
    rows.sort(key=lambda r: (r["rank"], r["size_bytes"], r["latency_ms"]))
    winners = pick_winners(rows)
    summary = {"dataset": data_cfg.dataset, "fingerprint": fingerprint, "seeds": seeds,
               "data": dataclasses.asdict(data_cfg), "shared_augment": dataclasses.asdict(settings.augment),
               "train": dataclasses.asdict(settings.train), "latency_runs": top.latency_runs, "rank_by": top.rank_by,
               "config_file": str(settings.config_file) if settings.config_file else None}
    out = write_report(Path(top.artifacts) / "reports" / report, report, rows, winners, summary)
    print_table(rows, winners)
    print(f"\nreport: {out / 'report.html'} (leaderboard.md/.csv/.json, winners.json, plots/)")
    return CompareResult(out, rows, winners, summary)
