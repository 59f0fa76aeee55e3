"""Where Ray enters: the executor (core/executor.py) is the one module of the product that imports it."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mona_ray"
IMPORTS_RAY = re.compile(r"^\s*(import ray\b|from ray\b)", re.MULTILINE)


def test_ray_is_imported_by_the_executor_alone():
    importers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                       if IMPORTS_RAY.search(p.read_text(encoding="utf-8")))
    # bench/ drives Ray itself to measure the product (a worker node removed mid-run, cluster set-up)
    assert [p for p in importers if not p.startswith("bench/")] == ["core/executor.py"], importers


def test_stages_are_plain_functions_over_typed_units():
    text = (PACKAGE / "pipeline" / "stages.py").read_text(encoding="utf-8")
    assert not IMPORTS_RAY.search(text) and "json.loads(" not in text  # no work item travels as JSON text
