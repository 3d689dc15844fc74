"""What importing a layer loads, and the card schema training writes with.

The import-linter contracts in pyproject.toml check the import statements;
these tests check what a fresh interpreter really loads, which also catches an
import made through a package's ``__init__``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.contract.cards import dump_model_card, read_model_card

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CARDS = sorted((REPO / "models").glob("*.json"))


def _loaded_by(module: str, candidates: tuple[str, ...]) -> list[str]:
    """Which of ``candidates`` a fresh interpreter has loaded after importing ``module``."""
    script = (
        "import json, sys\n"
        f"import {module}\n"
        f"print(json.dumps(sorted(m for m in {candidates!r} if m in sys.modules)))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        # Loading the ONNX runtime needs neither the settings nor a FITS reader.
        ("service.core.runtime", ("pydantic_settings", "astropy", "fastapi", "starlette")),
        ("service.contract.cards", ("pydantic_settings", "astropy", "fastapi", "onnxruntime")),
        # The settings build FitsLimits from service.fits.raw, which needs no astropy.
        ("service.settings", ("astropy", "fastapi", "onnxruntime")),
        ("service.client", ("fastapi", "onnxruntime", "astropy", "numpy")),
    ],
)
def test_importing_a_layer_loads_nothing_above_it(module, absent):
    assert _loaded_by(module, absent) == []


def test_the_import_check_sees_a_loaded_module():
    # The check above can fail: the API layer does load FastAPI and astropy.
    assert _loaded_by("service.api.app", ("fastapi", "astropy")) == ["astropy", "fastapi"]


@pytest.mark.parametrize("path", SHIPPED_CARDS, ids=lambda p: p.name)
def test_a_card_written_through_the_schema_keeps_every_key_and_value(path):
    # training/export.py writes each card with dump_model_card(ModelCard(...)).
    assert json.loads(dump_model_card(read_model_card(path))) == json.loads(path.read_text())


def test_the_shipped_cards_are_there():
    assert [path.name for path in SHIPPED_CARDS] == [
        "einstein_radius.json",
        "einstein_radius_mc.json",
        "lens_classifier.json",
    ]
