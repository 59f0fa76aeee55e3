"""Bad input is processed or rejected with file, row and reason; nothing is dropped silently."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import tiny_overrides
from mona_ray.core.records import InputError
from mona_ray.config import load_config
from mona_ray.pipeline.cli import run


@pytest.fixture(scope="module")
def messy(tmp_path_factory, tiny_data):
    d = tmp_path_factory.mktemp("messy")
    src = d / "src"
    src.mkdir()
    good = [{"id": f"g{i}", "instruction": "add two and three", "input": "", "output": "five " * (i + 1)} for i in range(20)]
    pq.write_table(pa.Table.from_pylist(good), src / "a_good.parquet")
    lines = [
        json.dumps({"id": "m0", "instruction": "the cat sat", "output": "on the mat"}),                      # 0 alpaca
        json.dumps({"id": "m1", "conversations": [{"from": "human", "value": "write code"},
                                                 {"from": "gpt", "value": "print sum"}]}),               # 1 sharegpt
        json.dumps({"id": "m2", "messages": [{"role": "user", "content": "sky blue"},
                                            {"role": "assistant", "content": "sea green"}]}),             # 2 messages
        '{"id": "m3", "instruction": "broken',                                                            # 3 malformed
        json.dumps({"id": "m4", "instruction": "q", "output": None}),                                    # 4 null
        json.dumps({"id": "m5", "instruction": 123, "output": "x"}),                                     # 5 wrong type
        json.dumps({"id": "m6", "instruction": "", "input": "", "output": ""}),                           # 6 empty strings
        None,                                                                                             # 7 non-UTF-8
        json.dumps({"id": "m8", "instruction": "dog " * 250_000, "output": "ran"}),                       # 8 1M chars
        json.dumps({"id": "g3", "instruction": "duplicate id of a_good row 3", "output": "x"}),          # 9 duplicate id
        json.dumps({"id": "m10", "text": "no known fields"}),                                             # 10 unknown format
    ]
    with open(src / "b_mixed.jsonl", "wb") as fh:
        for line in lines:
            fh.write(b"\xff\xfe not utf8\n" if line is None else line.encode() + b"\n")
    (src / "c_corrupt.parquet").write_bytes(b"PAR1 this is not a parquet file")
    empty_tgt = d / "empty_target.jsonl"
    empty_tgt.write_text("")
    sharegpt_tgt = d / "target_sharegpt.jsonl"
    sharegpt_tgt.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": "add two"},
                                                                  {"from": "gpt", "value": "five"}]}) + "\n" for _ in range(3)))
    return {"source": src, "target": sharegpt_tgt, "empty_target": empty_tgt, "dir": d}


def test_every_bad_row_is_reported_and_the_rest_is_scored(ray_local, tiny_lm, tiny_sae, messy, tmp_path):
    out = tmp_path / "out"
    m = run(load_config(tiny_overrides(tiny_lm, tiny_sae, messy, out, "select.count=5")), quiet=True)
    rej = pq.read_table(out / "rejected.parquet").to_pylist()
    by_row = {(r["file"].rsplit("/", 1)[-1], r["row"]): r["reason"] for r in rej if r["set"] == "source"}
    assert "malformed JSON" in by_row[("b_mixed.jsonl", 3)]
    assert "'output' is null" in by_row[("b_mixed.jsonl", 4)]
    assert "type int" in by_row[("b_mixed.jsonl", 5)]
    assert "empty" in by_row[("b_mixed.jsonl", 6)]
    assert "UTF-8" in by_row[("b_mixed.jsonl", 7)]
    assert "duplicate id (first seen at" in by_row[("b_mixed.jsonl", 9)] and "a_good.parquet:3" in by_row[("b_mixed.jsonl", 9)]
    assert "unknown record format" in by_row[("b_mixed.jsonl", 10)]
    assert "cannot read file" in by_row[("c_corrupt.parquet", -1)]
    assert len(by_row) == 8
    scores = pq.read_table(out / "scores.parquet")
    scored = set(scores.column("id").to_pylist())
    assert {"m0", "m1", "m2", "m8"} <= scored  # all three formats, and the 1M-character row (truncated)
    c = m["counts"]["source"]
    assert c["rows_in"] == c["rows_scored"] + c["rows_rejected"] == 20 + 11 + 1
    assert m["counts"]["target"]["rows_usable"] == 3  # a target set in another format is fine


def test_empty_target_set_fails_clearly(ray_local, tiny_lm, tiny_sae, messy, tmp_path):
    data = {**messy, "target": messy["empty_target"]}
    with pytest.raises(InputError, match=r"target set .*empty_target.jsonl.* has no usable rows"):
        run(load_config(tiny_overrides(tiny_lm, tiny_sae, data, tmp_path / "o")), quiet=True)


def test_too_many_rejections_fail_clearly(ray_local, tiny_lm, tiny_sae, messy, tmp_path):
    with pytest.raises(InputError, match=r"rejected .*run.max_rejected_fraction=0.1"):
        run(load_config(tiny_overrides(tiny_lm, tiny_sae, messy, tmp_path / "o", "run.max_rejected_fraction=0.1")), quiet=True)


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mona_ray.run", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_paper_experiment_resolves_and_fails_cleanly_without_weights(tmp_path):
    out = tmp_path / "never"
    p = cli("+experiment=openhermes_llama3", f"run.output_dir={out}", cwd=tmp_path)
    assert p.returncode == 2
    assert "model.path='/models/Meta-Llama-3-8B'" in p.stderr and "set model.path=" in p.stderr
    assert "Traceback" not in p.stderr
    assert not out.exists()  # nothing half-written


def test_missing_sae_names_the_override(tiny_lm, tmp_path):
    p = cli(f"model.path={tiny_lm}", f"sae.path={tmp_path / 'no_sae'}", f"run.output_dir={tmp_path / 'o'}", cwd=tmp_path)
    assert p.returncode == 2 and "sae.path=" in p.stderr and "no_sae" in p.stderr and "Traceback" not in p.stderr


def test_no_single_record_can_stop_the_run(ray_local, tiny_lm, tiny_sae, tiny_data, tmp_path):
    """A lone surrogate escape (valid JSON, invalid Unicode), a deeply nested record and a
    BOM-prefixed file: each bad row is rejected with its reason, the rest of the run completes."""
    src = tmp_path / "src"
    src.mkdir()
    good = [json.dumps({"id": f"g{i}", "instruction": "add two and three", "output": "five " * (i + 1)}) for i in range(12)]
    lines = [good[0],
             '{"id": "sur", "conversations": [{"from": "human", "value": "bad \\ud800 text"}, {"from": "gpt", "value": "x"}]}',
             '{"id": "meta", "instruction": "the cat", "output": "sat", "note": "\\udfff"}',
             '{"id": "deep", "instruction": "q", "output": "a", "x": ' + "[" * 50_000 + "]" * 50_000 + "}",
             *good[1:6]]
    (src / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    (src / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(good[6:]).encode() + b"\n")
    out = tmp_path / "out"
    m = run(load_config(tiny_overrides(tiny_lm, tiny_sae, {**tiny_data, "source": src}, out, "select.count=3")), quiet=True)
    rej = {(r["file"].rsplit("/", 1)[-1], r["row"]): r for r in pq.read_table(out / "rejected.parquet").to_pylist()
           if r["set"] == "source"}
    assert set(rej) == {("a.jsonl", 1), ("a.jsonl", 2), ("a.jsonl", 3)}
    assert "lone surrogate" in rej[("a.jsonl", 1)]["reason"] and rej[("a.jsonl", 1)]["id"] == "sur"
    assert "UnicodeEncodeError" in rej[("a.jsonl", 2)]["reason"]  # in a field that is kept, not rendered
    assert "RecursionError" in rej[("a.jsonl", 3)]["reason"]
    scored = set(pq.read_table(out / "scores.parquet").column("id").to_pylist())
    assert scored == {f"g{i}" for i in range(12)}  # both BOM-prefixed first rows read
    c = m["counts"]["source"]
    assert c["rows_in"] == 15 == c["rows_scored"] + c["rows_rejected"]


def _tiny_lm_without_template(tiny_lm, dest):
    import shutil

    shutil.copytree(tiny_lm, dest)
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((dest / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dest


def test_base_model_without_chat_template_fails_before_any_work(tiny_lm, tiny_sae, tiny_data, tmp_path):
    base = _tiny_lm_without_template(tiny_lm, tmp_path / "base_lm")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"render.mode='chat_template'.*no chat template.*set render.mode=plain"):
        run(load_config(tiny_overrides(base, tiny_sae, tiny_data, out)), quiet=True)
    assert not out.exists()  # failed in the plan, before any task or file


def test_paper_experiment_renders_on_a_base_tokenizer(ray_local, tiny_lm, tiny_sae, tiny_data, tmp_path):
    """+experiment=openhermes_llama3's own rendering settings on a tokenizer with no chat template."""
    base = _tiny_lm_without_template(tiny_lm, tmp_path / "base_lm")
    out = tmp_path / "out"
    cfg = load_config(["+experiment=openhermes_llama3",
                       *tiny_overrides(base, tiny_sae, tiny_data, out, "sae.k=null", "embed.token_budget=512",
                                       "render.max_length=2048")])
    assert cfg.render.mode == "plain"
    m = run(cfg, quiet=True)
    assert m["counts"]["source"]["rows_scored"] == 90 and m["counts"]["source"]["rows_selected"] == 10
