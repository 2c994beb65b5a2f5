"""The modules a command line needs to parse and validate import neither TensorFlow nor Keras."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

LIGHT = ("transfer.data", "transfer.baselines", "transfer.backbones", "transfer.heads", "transfer.freezing",
         "transfer.recipes", "transfer.evaluate", "transfer.images")


def test_light_modules_import_no_tensorflow_or_keras():
    code = (
        f"import sys\nimport {', '.join(LIGHT)}\n"
        "from transfer.backbones import get_backbone\n"
        "from transfer.baselines import BaselineConfig, baseline_recipe\n"
        "from transfer.config import DataConfig, ModelConfig\n"
        "from transfer.data import get_source, load_dataset\n"
        "from transfer.recipes import finetune_recipe\n"
        # validating a run and loading its data stay TF-free too
        "finetune_recipe(ModelConfig(backbone='vgg16', unfreeze='blocks:1'), 'synthetic')\n"
        "baseline_recipe(BaselineConfig('vgg3'), 'synthetic')\n"
        "load_dataset(DataConfig(synthetic_train=20, synthetic_test=10))\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'))\n"
        "assert not heavy, heavy[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr


def test_the_tensorflow_names_of_transfer_data_load_on_first_use():
    import transfer.data

    assert transfer.data.make_pipeline.__module__ == "transfer.data.pipeline"
    assert transfer.data.build_augmenter.__module__ == "transfer.data.pipeline"
