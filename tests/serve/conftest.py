"""Fixtures shared by the serve tests: one real export (trained and exported once per session, ~10 s)."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_fixtures import EXPORTED_FORMATS, build_export, keras_model


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(export dir, Keras model) of the tiny three-colour classifier, trained and exported for real."""
    export_dir = build_export(tmp_path_factory.mktemp("exports") / "tiny", formats=EXPORTED_FORMATS)
    return export_dir, keras_model(export_dir)


@pytest.fixture(scope="session")
def export_dir(exported) -> Path:
    return exported[0]
