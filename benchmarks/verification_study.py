"""The verification study: do export's parity rules pass every honest export and fail every broken artifact?

    python benchmarks/verification_study.py [--quick] [--datasets digits,synthetic[,folder:PATH]] [--work DIR]
                                            [--samples 1000] [--max-minutes 20] [--json FILE]

1. Honest exports. Over every scratch baseline that fits a dataset's images (`transfer baselines`) and three
   backbones trained from scratch at 32 px (MobileNetV2, ResNet50V2, EfficientNetB0, ``--weights none``), on each
   dataset (``digits``: real 8x8 handwritten digits bundled with scikit-learn; ``synthetic``: generated shapes at
   32x32; optionally a folder of real images), it trains a tiny run (1-3 epochs, so weak and better models alike),
   exports every format with verification (``export.exporter.run_export``, the code ``transfer export`` runs) and
   counts **false failures**: honest artifacts that fail verification (target 0). The per-format statistics it prints
   (agreement, max / p99 / mean |diff|, accuracy loss) are the measurement behind the thresholds in
   ``export/formats.py`` (docs/verification.md).
2. Broken artifacts. For some of those models it builds artifacts that are *not* the model, swaps each into a copy of
   the export with its manifest sha256 updated (so the hash check passes and only parity can catch it), runs
   ``export.exporter.reverify`` (what ``transfer verify`` runs) and counts how many fail (target all):
   - wrong weights: the same recipe trained with another seed, its artifacts swapped in;
   - missing preprocessing: the model exported without its preprocessing layer (raw 0..255 into the network);
   - permuted labels: the softmax layer's output columns rotated by one;
   - a file from another run: another model's artifacts (same dataset and input shape) swapped in.

A script, not a test: it prints tables and asserts nothing. ``--quick`` trains a handful of models (a few minutes on
2 cores); the full study is bounded by ``--max-minutes`` (models left when the budget is spent are listed as skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

BACKBONES = ("mobilenetv2", "resnet50v2", "efficientnetb0")
SYNTHETIC_ARGS = ["--synthetic-train", "800", "--synthetic-test", "300"]
QUICK = {"digits": ("vgg1", "fashion-mnist-cnn", "mobilenetv2"), "synthetic": ("lenet5", "vgg2")}
BIG = ("vgg16-like", "vgg19-like")  # 32-43 M parameters: one epoch, and only with --all (minutes each to export)
SLOW = ("resnet50v2",)  # on the first dataset only unless --all (about 3 minutes a run on 2 cores)
FINE_TUNE_LR = None  # --fine-tune-lr of the backbones (None: the toolkit's default); set by main
KINDS = ("wrong weights", "missing preprocessing", "permuted labels", "file from another run")


@dataclass
class Model:
    dataset: str
    name: str  # a baseline or a backbone
    backbone: bool
    epochs: int
    run: Path | None = None
    export: Path | None = None
    reports: dict = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.name}"


# ---------------------------------------------------------------------------------------------- running quietly


@contextlib.contextmanager
def quiet(log: Path):
    """Send what training and exporting print (Keras progress, converter chatter) to ``log``."""
    with open(log, "a") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        yield


def say(text: str) -> None:
    print(text, file=sys.__stdout__, flush=True)


def release() -> None:
    import keras

    keras.backend.clear_session()
    gc.collect()


# ---------------------------------------------------------------------------------------------- the models


def native_side(dataset: str) -> int:
    from transfer.config import DataConfig
    from transfer.data import load_dataset

    data = load_dataset(DataConfig(dataset=dataset, **({"synthetic_train": 20, "synthetic_test": 10}
                                                       if dataset == "synthetic" else {})), image_size=None)
    return int(data.native_shape[0]) if data.native_shape else 32


def plan(datasets: list[str], quick: bool, only: list[str] | None = None, everything: bool = False) -> list[Model]:
    """Per dataset its baselines, then its backbones; (--all) the big baselines last: a time budget cuts the end."""
    from transfer.baselines import BASELINES

    models, big = [], []
    for d, dataset in enumerate(datasets):
        side = native_side(dataset)
        names = [n for n, row in BASELINES.items() if row.min_size() <= side and n not in BIG] + list(BACKBONES)
        names += [n for n in BIG if BASELINES[n].min_size() <= side]
        if quick:
            names = [n for n in names if n in QUICK.get(dataset, QUICK["synthetic"])]
        elif not everything:
            names = [n for n in names if n not in BIG and (d == 0 or n not in SLOW)]
        if only:
            names = [n for n in names if n in only]
        for i, name in enumerate(names):
            epochs = 1 if name in BIG else (1, 2, 3)[i % 3]
            (big if name in BIG else models).append(Model(dataset, name, name in BACKBONES, epochs))
    return sorted(models, key=lambda m: (datasets.index(m.dataset), m.backbone)) + big


def train(model: Model, artifacts: Path, log: Path, seed: int = 0, suffix: str = "") -> Path:
    from transfer.cli import main

    run = f"{model.dataset.replace(':', '_').replace('/', '_')}-{model.name}{suffix}"
    common = ["--dataset", model.dataset, "--epochs", str(model.epochs), "--no-tensorboard", "--seed", str(seed),
              "--artifacts", str(artifacts), "--name", run, *(SYNTHETIC_ARGS if model.dataset == "synthetic" else [])]
    if model.backbone:
        argv = ["finetune", "--backbone", model.name, "--weights", "none", "--image-size", "32", "--head-epochs", "0",
                "--unfreeze", "all", *(["--fine-tune-lr", str(FINE_TUNE_LR)] if FINE_TUNE_LR else []), *common]
    else:
        argv = ["baseline", "--model", model.name, *common]
    with quiet(log):
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"training exited {code} (see {log})")
    return artifacts / "runs" / run


def export(run: Path, out: Path, log: Path, samples: int, verify: bool = True) -> dict:
    from export.exporter import ExportConfig, run_export

    with quiet(log):
        result = run_export(ExportConfig(run_dir=str(run), out=str(out), verify=verify, verify_samples=samples,
                                         overwrite=True))
    return result.reports


# ---------------------------------------------------------------------------------------------- broken artifacts


def rebuilt(model, *, skip_preprocessing: bool = False, permute: bool = False):
    """``model`` (a chain of layers: input -> [resize] -> preprocess -> ... -> predictions) called layer by layer,
    without its preprocessing layer or with its softmax layer's output columns rotated by one; None when there is
    no preprocessing to leave out (an identity)."""
    import keras

    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if skip_preprocessing:
        pre = [layer for layer in layers if layer.name == "preprocess"]
        if not pre or isinstance(pre[0], keras.layers.Identity):
            return None
    x = inputs = keras.Input(shape=model.input_shape[1:], name="image")
    for layer in layers[:-1]:
        if not (skip_preprocessing and layer.name == "preprocess"):
            x = layer(x)
    last = layers[-1]
    if permute:
        kernel, bias = last.get_weights()
        order = np.roll(np.arange(kernel.shape[1]), 1)
        head = keras.layers.Dense(kernel.shape[1], activation="softmax", name="permuted")
        x = head(x)
        head.set_weights([kernel[:, order], bias[order]])
    else:
        x = last(x)
    return keras.Model(inputs, x)


def export_model(keras_model, dataset, seed: int, dest: Path, log: Path) -> Path:
    """Every format of ``keras_model`` written into ``dest`` by the format table's own exporters."""
    from export.exporter import calibration_images
    from export.formats import FORMATS, ExportContext, ExportOptions

    dest.mkdir(parents=True)
    ctx = ExportContext(keras_model, dest / ".work", lambda n: calibration_images(dataset.train, n, seed))
    with quiet(log):
        for row in FORMATS.values():
            row.export(ctx, dest / row.file, ExportOptions())
    shutil.rmtree(dest / ".work", ignore_errors=True)
    return dest


def doctored(export_dir: Path, source: Path, dest: Path) -> Path:
    """A copy of ``export_dir`` whose every artifact is ``source``'s, with the manifest's sha256 updated to match
    (the hash check passes: only parity can tell)."""
    from export.contract import FORMATS_KEY, MANIFEST, SECTION, SHA256_KEY, sha256_of
    from export.formats import FORMATS

    shutil.copytree(export_dir, dest)
    manifest = json.loads((dest / MANIFEST).read_text())
    for name, entry in manifest[SECTION][FORMATS_KEY].items():
        theirs = source / FORMATS[name].file
        if not theirs.exists():
            continue
        mine = dest / FORMATS[name].file
        shutil.rmtree(mine) if mine.is_dir() else mine.unlink(missing_ok=True)
        (shutil.copytree if theirs.is_dir() else shutil.copy2)(theirs, mine)
        entry[SHA256_KEY] = sha256_of(mine)
    (dest / MANIFEST).write_text(json.dumps(manifest))
    return dest


def broken_cases(model: Model, other: Model | None, work: Path, log: Path, samples: int) -> dict[str, dict]:
    """Kind -> {format: report} for ``model``'s broken artifacts (None where the kind does not apply)."""
    from export.exporter import reverify
    from transfer import rundir
    from transfer.data import load_run_dataset
    from transfer.runmodel import load_run_model

    source = rundir.load_complete(model.run)
    seed = int(source["config"]["train"].get("seed", 0))
    dataset = load_run_dataset(source, model.run)
    keras_model = load_run_model(model.run)
    base = work / "broken" / model.label.replace("/", "-").replace(":", "_")
    sources: dict[str, Path | None] = {}
    twin = train(model, work / "twins", log, seed=1, suffix="-seed1")
    sources["wrong weights"] = export_model(load_run_model(twin), dataset, seed, base / "twin", log)
    without = rebuilt(keras_model, skip_preprocessing=True)
    sources["missing preprocessing"] = (export_model(without, dataset, seed, base / "nopre", log)
                                        if without is not None else None)
    sources["permuted labels"] = export_model(rebuilt(keras_model, permute=True), dataset, seed, base / "perm", log)
    sources["file from another run"] = other.export if other is not None else None
    results = {}
    for kind, files in sources.items():
        if files is None:
            results[kind] = None
            continue
        copy = doctored(model.export, files, base / f"export-{kind.replace(' ', '-')}")
        with quiet(log):
            results[kind] = reverify(copy, samples).reports
    release()
    return results


# ---------------------------------------------------------------------------------------------- tables


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _sci(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def _failed(report: dict) -> bool:
    return not report.get("passed")


def rejudge(report: dict, name: str) -> dict:
    """``report`` judged again by the format table's current rules (a study's JSON outlives a change of numbers)."""
    from export.formats import FORMATS
    from export.verify import judge

    if "top1_agreement" not in report or "median_tv" not in report:
        return report
    thresholds = FORMATS[name].thresholds
    failures, notes = judge(report, thresholds)
    return {**report, "thresholds": thresholds.as_dict(), "failures": failures, "notes": notes,
            "passed": not failures}


def above_chance(m: Model) -> bool:
    """Whether the model's Keras accuracy on its test images is significantly above chance (exact binomial test, as
    export.verify notes it): a model at chance has no decisions an artifact could keep, so its failures are listed
    beside the false-failure count, not in it."""
    from transfer.compare.stats import ALPHA, p_above_chance

    first = next((r for r in m.reports.values() if r.get("test_samples")), None)
    if first is None:
        return True
    classes = len(json.loads((m.export / "manifest.json").read_text())["classes"])
    n = first["test_samples"]
    return p_above_chance(round(first["reference_accuracy"] * n), n, 1 / classes) < ALPHA


def print_models(models: list[Model], formats: list[str]) -> None:
    say("\nHonest exports, one row per trained model: per format, top-1 agreement with the Keras model on all the "
        "verification images / on those it decides, and max |diff| (F = failed verification)")
    header = f"{'dataset/model':<32}{'ep':>3}{'acc':>6}{'n':>5}" + "".join(f"{name:>19}" for name in formats)
    say(header)
    say("-" * len(header))
    for m in models:
        if m.error:
            say(f"{m.label:<32}{m.epochs:>3}  {m.error}")
            continue
        first = next(iter(m.reports.values()), {})
        cells = []
        for name in formats:
            r = m.reports.get(name) or {}
            if "top1_agreement" not in r:
                cells.append(f"{'export failed' if r else '-':>19}")
                continue
            text = (f"{'F ' if _failed(r) else ''}{r['top1_agreement'] * 100:.0f}/{r['decisive_agreement'] * 100:.0f}% "
                    f"{r['max_abs_diff']:.0e}")
            cells.append(f"{text:>19}")
        say(f"{m.label:<32}{m.epochs:>3}{first.get('reference_accuracy', 0) * 100:>5.0f}%{first.get('samples', 0):>5}"
            + "".join(cells))


def print_formats(models: list[Model], formats: list[str]) -> dict:
    say("\nPer format over the honest exports (the measurement behind the thresholds)")
    say("(false fail: failures of models significantly above chance; at chance: failures of models that are not, whose "
        "decisions carry nothing for an artifact to keep, listed apart)")
    header = (f"{'format':<16}{'exports':>8}{'false fail':>11}{'at chance':>10}{'min agree':>10}"
              f"{'min decided (CI hi)':>21}"
              f"{'max|diff|':>10}{'p99|diff|':>10}{'medTV':>9}{'mean|diff|':>11}{'max loss':>9}{'min p':>7}  rule")
    say(header)
    say("-" * len(header))
    summary = {}
    from export.formats import FORMATS

    for name in formats:
        judged = [m for m in models if "top1_agreement" in (m.reports.get(name) or {})]
        reports = [m.reports[name] for m in judged]
        if not reports:
            continue
        fair = [m.reports[name] for m in judged if above_chance(m)]
        drops = [r["accuracy_drop"] for r in reports if r.get("test_samples")]
        s = {
            "exports": len(reports),
            "false_failures": sum(_failed(r) for r in fair),
            "at_chance_failed": sum(_failed(m.reports[name]) for m in judged if not above_chance(m)),
            "failed": [m.label for m in models if _failed(m.reports.get(name) or {"passed": True})],
            "min_agreement": min(r["top1_agreement"] for r in reports),
            "min_decided": min(r["decisive_agreement"] for r in reports),
            "min_decided_ci_high": min(r["decisive_ci95"][1] for r in reports),
            "max_abs_diff": max(r["max_abs_diff"] for r in reports),
            "max_p99_abs_diff": max(r["p99_abs_diff"] for r in reports),
            "max_median_tv": max(r.get("median_tv", float("nan")) for r in reports),
            "max_mean_abs_diff": max(r["mean_abs_diff"] for r in reports),
            "max_loss": max(drops) if drops else None,
            "min_p": min(r["p_value"] for r in reports),
        }
        summary[name] = s
        t = FORMATS[name].thresholds
        rule = "; ".join(part for part in (
            f"max|diff|<={t.max_abs_diff:g}" if t.max_abs_diff is not None else "",
            f"p99|diff|<={t.max_p99_abs_diff:g}" if t.max_p99_abs_diff is not None else "",
            f"medTV<={t.max_median_tv:g}" if t.max_median_tv is not None else "",
            f"agree>={t.min_top1_agreement:.0%}" if t.min_top1_agreement is not None else "",
            f"loss<={t.max_accuracy_drop * 100:g}pt" if t.max_accuracy_drop is not None else "") if part)
        loss = "-" if s["max_loss"] is None else f"{s['max_loss'] * 100:+.2f}"
        decided = f"{_pct(s['min_decided'])} ({_pct(s['min_decided_ci_high'])})"
        say(f"{name:<16}{s['exports']:>8}{s['false_failures']:>11}{s['at_chance_failed']:>10}"
            f"{_pct(s['min_agreement']):>10}{decided:>21}"
            f"{_sci(s['max_abs_diff']):>10}{_sci(s['max_p99_abs_diff']):>10}{_sci(s['max_median_tv']):>9}"
            f"{_sci(s['max_mean_abs_diff']):>11}{loss:>9}{s['min_p']:>7.2g}  {rule}")
    return summary


def _why(report: dict) -> str:
    text = " ".join(report.get("failures") or [])
    for needle, short in (("inference failed", "run"), ("|diff|", "diff"), ("total-variation", "tv"),
                          ("agreement", "agree"),
                          ("points below", "loss"), ("output shape", "shape"), ("non-finite", "nan")):
        if needle in text:
            return short
    return "?"


def print_broken(broken: dict[str, dict[str, dict | None]], formats: list[str]) -> dict:
    say("\nBroken artifacts: caught/tried per kind and format, the highest decided agreement and the lowest median "
        "total-variation distance among them, and what caught them (diff, tv, agree, loss, run)")
    header = f"{'kind':<22}" + "".join(f"{name:>23}" for name in formats) + f"{'total':>9}"
    say(header)
    say("-" * len(header))
    totals = {}
    for kind in KINDS:
        cells, caught_all, tried_all = [], 0, 0
        for name in formats:
            reports = [cases[kind][name] for cases in broken.values() if cases.get(kind) and name in cases[kind]]
            caught = sum(_failed(r) for r in reports)
            agreements = [r["decisive_agreement"] for r in reports if "decisive_agreement" in r]
            whys = sorted({_why(r) for r in reports if _failed(r)})
            caught_all, tried_all = caught_all + caught, tried_all + len(reports)
            tvs = [r["median_tv"] for r in reports if "median_tv" in r]
            top = f" {max(agreements):.0%}" if agreements else ""
            low = f" {min(tvs):.2f}" if tvs else ""
            cell = f"{caught}/{len(reports)}{top}{low} {'+'.join(whys)}"
            cells.append(f"{cell:>23}")
        totals[kind] = (caught_all, tried_all)
        say(f"{kind:<22}" + "".join(cells) + f"{f'{caught_all}/{tried_all}':>9}")
    skipped = [f"{label}: {kind}" for label, cases in broken.items() for kind in KINDS if cases.get(kind) is None]
    if skipped:
        say(f"not applicable: {'; '.join(skipped)} (preprocessing is an identity, or no other model on that dataset)")
    return totals


# ---------------------------------------------------------------------------------------------- main


def summarize(models: list[Model], broken: dict, formats: list[str], datasets: list[str], minutes: float,
              honest_minutes: float, work: Path, json_path: str | None) -> None:
    """The study's tables and totals (and its JSON when asked), every report judged by the current rules."""
    for m in models:
        m.reports = {name: rejudge(r, name) for name, r in m.reports.items()}
    broken = {label: {kind: None if reports is None else {n: rejudge(r, n) for n, r in reports.items()}
                      for kind, reports in cases.items()} for label, cases in broken.items()}
    print_models(models, formats)
    summary = print_formats(models, formats)
    totals = print_broken(broken, formats)
    honest = [m for m in models if m.reports]
    fair = [m for m in honest if above_chance(m)]
    false_failures = sum(_failed(r) for m in fair for r in m.reports.values() if "top1_agreement" in r)
    artifacts = sum(1 for m in fair for r in m.reports.values() if "top1_agreement" in r)
    at_chance = [m for m in honest if not above_chance(m)]
    chance_failed = {m.label: [n for n, r in m.reports.items() if _failed(r)] for m in at_chance}
    caught = sum(c for c, _ in totals.values())
    tried = sum(t for _, t in totals.values())
    say(f"\nfalse failures: {false_failures} of {artifacts} honest artifacts ({len(fair)} models above chance on "
        f"{len(datasets)} datasets; target 0)")
    if at_chance:
        say(f"models at chance level ({len(at_chance)}; not counted above): " + "; ".join(
            f"{label} failed {', '.join(names) or 'nothing'}" for label, names in chance_failed.items()))
    say(f"broken artifacts caught: {caught} of {tried} (target all)")
    say(f"time: {minutes:.1f} min ({honest_minutes:.1f} min honest exports); work directory {work}")
    if json_path:
        Path(json_path).write_text(json.dumps({
            "models": [{"model": m.label, "epochs": m.epochs, "error": m.error, "seconds": m.seconds,
                        "reports": m.reports} for m in models],
            "formats": summary, "broken": broken, "false_failures": false_failures, "artifacts": artifacts,
            "at_chance": chance_failed, "broken_caught": caught, "broken_tried": tried, "minutes": minutes,
            "honest_minutes": honest_minutes, "datasets": datasets}, indent=1, default=str))


def tables_from(json_path: str, work: Path) -> int:
    """Print the tables again from a finished study's JSON and its kept work directory (``--tables``)."""
    from export.formats import FORMATS

    data = json.loads(Path(json_path).read_text())
    models = []
    for row in data["models"]:
        dataset, name = row["model"].split("/", 1)
        m = Model(dataset, name, name in BACKBONES, row["epochs"], reports=row["reports"], seconds=row["seconds"],
                  error=row["error"])
        m.export = work / "exports" / row["model"].replace("/", "-")
        models.append(m)
    datasets = data.get("datasets") or sorted({m.dataset for m in models}, key=[m.dataset for m in models].index)
    summarize(models, data["broken"], list(FORMATS), datasets, data["minutes"],
              data.get("honest_minutes", sum(m.seconds for m in models) / 60), work, None)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a handful of models (a few minutes)")
    parser.add_argument("--datasets", default="digits,synthetic", help="comma-separated dataset sources")
    parser.add_argument("--models", help="only these baselines/backbones (comma-separated)")
    parser.add_argument("--work", help="keep runs and exports here (default: a temporary directory, removed)")
    parser.add_argument("--samples", type=int, default=None, help="--verify-samples (default: export's default)")
    parser.add_argument("--max-minutes", type=float, default=25.0,
                        help="time budget: no new model is trained after 80%% of it, no broken artifacts after it")
    parser.add_argument("--all", action="store_true", help="every model on every dataset (resnet50v2 on each, "
                        "vgg16-like, vgg19-like) and broken artifacts for more of them: about an hour on 2 cores "
                        "(pass --max-minutes 90)")
    parser.add_argument("--broken", default=None, metavar="BASELINES,BACKBONES",
                        help="how many baselines and backbones of each dataset get broken artifacts (default: 1,0 "
                             "with --quick, 2,1 with --all, else 1,1 on the first dataset and 1,0 on the others)")
    parser.add_argument("--json", help="write every report here")
    parser.add_argument("--epochs", type=int, help="train every model this many epochs (default: 1, 2, 3 in turn)")
    parser.add_argument("--fine-tune-lr", type=float, help="the backbones' --fine-tune-lr (default: the toolkit's; "
                        "1e-3 trains them from scratch in a few epochs, as configs/quickstart.toml does)")
    parser.add_argument("--tables", metavar="JSON", help="only print the tables of a finished study from its --json "
                        "and its kept --work directory")
    args = parser.parse_args(argv)
    if args.tables:
        return tables_from(args.tables, Path(args.work or "."))

    from export.formats import FORMATS, VerifyOptions

    samples = args.samples or VerifyOptions().verify_samples
    formats = list(FORMATS)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="verification-study-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "study.log"
    start = time.perf_counter()
    datasets = [d for d in args.datasets.split(",") if d]
    models = plan(datasets, args.quick, args.models.split(",") if args.models else None, args.all)
    for m in models if args.epochs else []:
        m.epochs = args.epochs
    global FINE_TUNE_LR
    FINE_TUNE_LR = args.fine_tune_lr
    say(f"verification study: {len(models)} models on {', '.join(datasets)}; {samples} verification images; "
        f"log {log}")

    # 1. honest exports
    for i, m in enumerate(models):
        if (time.perf_counter() - start) / 60 > args.max_minutes * 0.8:
            m.error = "skipped (time budget)"
            continue
        t0 = time.perf_counter()
        try:
            m.run = train(m, work / "artifacts", log)
            m.export = work / "exports" / m.run.name
            m.reports = export(m.run, m.export, log, samples)
        except Exception as exc:  # a model that cannot train or export is reported, the study goes on
            m.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        m.seconds = time.perf_counter() - t0
        release()
        failed = [n for n, r in m.reports.items() if _failed(r)]
        say(f"[{i + 1}/{len(models)}] {m.label}: {m.seconds:.0f}s "
            f"{m.error or ('FAILED ' + ', '.join(failed) if failed else 'all verified')}")
    honest_seconds = time.perf_counter() - start

    # 2. broken artifacts, for a few models of each dataset (baselines and backbones alike)
    default = "1,0" if args.quick else "2,1" if args.all else None
    baselines, backbones = (int(n) for n in (args.broken or default or "1,1").split(","))
    broken: dict[str, dict] = {}
    for dataset in datasets:
        done = [m for m in models if m.dataset == dataset and m.export is not None and m.name not in BIG]
        first = dataset == datasets[0] or args.broken or default
        chosen = [m for m in done if not m.backbone][:baselines] + [m for m in done if m.backbone][:backbones if first
                                                                                                     else 0]
        for m in chosen:
            if (time.perf_counter() - start) / 60 > args.max_minutes:
                say(f"broken artifacts of {m.label}: skipped (time budget)")
                continue
            others = [o for o in done if o is not m]
            other = others[(done.index(m)) % len(others)] if others else None
            t0 = time.perf_counter()
            try:
                broken[m.label] = broken_cases(m, other, work, log, samples)
            except Exception as exc:
                say(f"broken artifacts of {m.label}: {type(exc).__name__}: {exc}")
                continue
            results = broken[m.label]
            caught = {k: f"{sum(_failed(r) for r in v.values())}/{len(v)}" for k, v in results.items() if v}
            say(f"broken artifacts of {m.label} (other run: {other.label if other else '-'}): "
                f"{time.perf_counter() - t0:.0f}s caught {caught}")

    summarize(models, broken, formats, datasets, (time.perf_counter() - start) / 60, honest_seconds / 60, work,
              args.json)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
