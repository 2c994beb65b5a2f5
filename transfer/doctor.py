"""``transfer doctor``: what is installed, what is cached, what is reachable, and the next command for each problem."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

from transfer.backbones import BACKBONES

PACKAGES = ("tensorflow", "keras", "tensorflow-hub", "tf-keras", "keras-hub", "tf2onnx", "onnx", "onnxruntime",
            "ai-edge-litert", "numpy", "protobuf", "fastapi", "uvicorn")
CORE_BACKBONES = ("vgg16", "resnet50", "mobilenetv2", "efficientnetb0")
HOSTS = (
    ("storage.googleapis.com", "ImageNet weights (keras.applications)"),
    ("www.cs.toronto.edu", "CIFAR-10/100"),
    ("www.kaggle.com", "TF Hub / Kaggle models, keras-hub presets"),
)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _minor(version: str | None) -> tuple[int, ...] | None:
    if not version:
        return None
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


@dataclass(frozen=True)
class Rule:
    """A known incompatibility: ``broken(versions)`` says whether it applies; ``fix`` is the next command."""

    text: str
    broken: Callable[[dict], bool]
    fix: str


RULES = (
    Rule("TensorFlow is not installed", lambda v: v["tensorflow"] is None, 'pip install -e "."'),
    Rule("Keras 2 is installed; the toolkit needs Keras 3",
         lambda v: v["keras"] is not None and _minor(v["keras"])[0] < 3, 'pip install "keras>=3.3,<4"'),
    Rule("tf-keras must match TensorFlow's major.minor (tensorflow-hub loads through it)",
         lambda v: None not in (v["tf-keras"], v["tensorflow"]) and _minor(v["tf-keras"]) != _minor(v["tensorflow"]),
         'pip install "tf-keras==<tensorflow major.minor>.*"'),
    Rule("tensorflow-hub is installed without tf-keras",
         lambda v: v["tensorflow-hub"] is not None and v["tf-keras"] is None, "pip install tf-keras"),
    Rule("NumPy 2 needs TensorFlow 2.18 or newer",
         lambda v: None not in (v["numpy"], v["tensorflow"]) and _minor(v["numpy"])[0] >= 2
         and _minor(v["tensorflow"]) < (2, 18), 'pip install "numpy<2"'),
    Rule("export extras missing (tf2onnx, onnx, onnxruntime, ai-edge-litert)",
         lambda v: any(v[p] is None for p in ("tf2onnx", "onnx", "onnxruntime", "ai-edge-litert")),
         'pip install -e ".[export]"'),
    Rule("serve extras missing (fastapi, uvicorn, onnxruntime)",
         lambda v: any(v[p] is None for p in ("fastapi", "uvicorn", "onnxruntime")), 'pip install -e ".[serve]"'),
)


def reachable(host: str, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to ``host``:443 opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def diagnose(network: bool = True) -> dict:
    """Everything ``transfer doctor`` reports, as data; ``problems`` pairs each finding with its next command."""
    versions = {package: _version(package) for package in PACKAGES}
    problems = [{"problem": rule.text, "next": rule.fix} for rule in RULES if rule.broken(versions)]
    gpus = []
    if versions["tensorflow"]:
        import tensorflow as tf

        gpus = [device.name for device in tf.config.list_physical_devices("GPU")]
    weights = {name: BACKBONES[name].weights_cached() for name in CORE_BACKBONES}
    from transfer.pretrained import PACKAGED, PRETRAINED_INSTALL

    packaged = {f"{row.backbone} --weights {row.name}": row.installed() for row in PACKAGED}
    from transfer.data.sources import SOURCES

    datasets = {source.name: source.cached() for source in SOURCES if hasattr(source, "cached")}
    hosts = {host: reachable(host) for host, _ in HOSTS} if network else {}
    offline = network and not any(hosts.values())
    if offline:
        missing = [name for name, ok in weights.items() if not ok]
        if missing:
            path = BACKBONES[missing[0]].weights_path()
            here = [name for name, ok in packaged.items() if ok]
            problems.append({
                "problem": f"offline and no ImageNet weights cached for {', '.join(missing)}",
                "next": f"copy the weights file to {path} (or pass --weights PATH), or use packaged weights: "
                        + (f"--backbone {here[0]}" if here else PRETRAINED_INSTALL + ", then --backbone "
                           + next(iter(packaged))),
            })
        if not any(datasets.values()):
            problems.append({
                "problem": "offline and no Keras dataset cached",
                "next": "transfer finetune --dataset synthetic ... (or --data-dir DIR with a pre-downloaded copy)",
            })
    if not gpus:
        problems.append({"problem": "no GPU visible: training runs on the CPU (fine for synthetic data and tests)",
                         "next": "on a GPU machine: pip install 'tensorflow[and-cuda]' and check nvidia-smi"})
    from transfer.backbones import KERAS_HUB_HANDLE, KERAS_HUB_INSTALL

    keras_hub = {"installed": versions["keras-hub"] is not None, "version": versions["keras-hub"],
                 "handle": KERAS_HUB_HANDLE}
    if offline and keras_hub["installed"]:
        problems.append({"problem": "offline: keras-hub presets named by name, kaggle:// or hf:// cannot be fetched",
                         "next": "save the preset on a connected machine (Backbone.from_preset(NAME).save_to_preset("
                                 "DIR), ImageConverter likewise) and pass --backbone keras_hub:DIR"})
    elif not keras_hub["installed"]:
        keras_hub["next"] = KERAS_HUB_INSTALL
    return {"versions": versions, "gpus": gpus, "imagenet_weights_cached": weights, "packaged_weights": packaged,
            "datasets_cached": datasets,
            "hosts_reachable": hosts, "keras_hub": keras_hub, "problems": problems}


def print_report(report: dict) -> None:
    print("versions:")
    for package, version in report["versions"].items():
        print(f"  {package:<16} {version or 'not installed'}")
    print(f"GPUs: {', '.join(report['gpus']) or 'none'}")
    keras_hub = report["keras_hub"]
    print(f"keras-hub: {keras_hub['version'] + ' installed' if keras_hub['installed'] else 'not installed'} "
          f"(--backbone {keras_hub['handle']})" + (f"; {keras_hub['next']}" if keras_hub.get("next") else ""))
    print("ImageNet weights cached: " + ", ".join(
        f"{name} {'yes' if ok else 'no'}" for name, ok in report["imagenet_weights_cached"].items()))
    print("packaged weights (no download): " + ", ".join(
        f"{name} {'installed' if ok else 'not installed'}" for name, ok in report["packaged_weights"].items()))
    print("datasets cached: " + ", ".join(
        f"{name} {'yes' if ok else 'no'}" for name, ok in report["datasets_cached"].items()))
    if report["hosts_reachable"]:
        print("reachable: " + ", ".join(
            f"{host} {'yes' if ok else 'no'}" for host, ok in report["hosts_reachable"].items()))
    else:
        print("reachable: not checked (--no-network)")
    if report["problems"]:
        print("problems and next steps:")
        for item in report["problems"]:
            print(f"  - {item['problem']}\n      next: {item['next']}")
    else:
        print("no problems found")


def register(subparsers) -> None:
    parser = subparsers.add_parser("doctor", help="check versions, caches, GPUs and network; print next steps")
    parser.add_argument("--no-network", action="store_true", help="skip the reachability checks")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=_cmd_doctor)


def _cmd_doctor(args) -> int:
    import json

    report = diagnose(network=not args.no_network)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0
