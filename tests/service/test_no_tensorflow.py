"""service/ must run without TensorFlow, Keras, lenstronomy or the training package."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

SERVICE_DIR = Path(__file__).resolve().parents[2] / "service"
FORBIDDEN = ("tensorflow", "keras", "tf_keras", "tf2onnx", "lenstronomy", "training")


def _imported_roots(path: Path) -> set[str]:
    """Top-level package names a module imports, from its syntax tree."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


#: Row (e) of ``lensserve bench`` is plain Keras by design; only the bench imports it, lazily.
BENCH_BASELINE = "bench/keras_baseline.py"


def test_no_service_module_imports_a_training_dependency():
    offenders = {
        path.relative_to(SERVICE_DIR).as_posix(): sorted(_imported_roots(path) & set(FORBIDDEN))
        for path in sorted(SERVICE_DIR.rglob("*.py"))
        if path.relative_to(SERVICE_DIR).as_posix() != BENCH_BASELINE
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_importing_and_building_the_app_loads_no_training_dependency():
    # A fresh interpreter: this test process may already hold TensorFlow from other tests.
    script = (
        "import json, sys\n"
        "import service.api.app, service.cli, service.core.runtime, service.core.batching\n"
        "import service.bench.run\n"
        "service.api.app.create_app()\n"
        f"forbidden = {FORBIDDEN!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in forbidden)))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=SERVICE_DIR.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == []
