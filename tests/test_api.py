"""mona_ray.select: the CLI's job from Python, and the README's example as written."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq

import mona_ray
from conftest import tiny_overrides

README = Path(__file__).resolve().parents[1] / "README.md"


def _model_overrides(tiny_lm, tiny_sae, tiny_data, out) -> list[str]:
    """The tiny model's overrides, without the paths and the selection size the caller sets."""
    return [o for o in tiny_overrides(tiny_lm, tiny_sae, tiny_data, out)
            if not o.startswith(("source.paths=", "target.paths=", "run.output_dir=", "select.count="))]


def test_select_returns_the_runs_selection(tiny_lm, tiny_sae, tiny_data, tmp_path):
    out = tmp_path / "out"
    sel = mona_ray.select(source=tiny_data["source"], target=[tiny_data["target"]], output_dir=out,
                          overrides=[*_model_overrides(tiny_lm, tiny_sae, tiny_data, out), "select.count=7"])
    assert isinstance(sel, mona_ray.Selection) and len(sel) == 7
    assert sel.output_dir == out.resolve() and sel.run_dir.parent.parent == out.resolve()
    lines = [json.loads(x) for x in (out / "selected.jsonl").read_text().splitlines()]
    assert sel.selected.column("id").to_pylist() == [r["id"] for r in lines]
    assert sel.selected.column("rank").to_pylist() == list(range(1, 8))
    assert sel.scores.num_rows == 90 and sel.manifest["status"] == "complete"
    assert [r["id"] for r in sel.explanation["selected"]] == [r["id"] for r in lines]
    assert sel.to_pandas()["id"].tolist() == [r["id"] for r in lines]
    assert sel.manifest["config"]["source"]["paths"] == [str(tiny_data["source"])]


def test_readme_example_runs_as_written(tiny_lm, tiny_sae, tiny_data, tmp_path, monkeypatch):
    block = re.search(r"From Python.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert "mona_ray.select(" in block and len(block.strip().splitlines()) <= 6
    monkeypatch.chdir(tmp_path)
    shutil.copy(tiny_data["target"], tmp_path / "my_task.jsonl")
    rows = pq.read_table(tiny_data["source"]).to_pylist()
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the example as written, with the tiny model in place of the embedded one
    tiny = ", ".join(repr(o) for o in _model_overrides(tiny_lm, tiny_sae, tiny_data, tmp_path))
    code = block.replace("overrides=[", f"overrides=[{tiny}, ", 1)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    sel = ns["sel"]
    assert len(sel) == 5 and len(ns["df"]) == 5  # 5% of 90 rows, rounded up
    assert (tmp_path / "outputs" / "demo" / "selected.jsonl").exists()
