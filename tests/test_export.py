"""Trainer-ready output: dataset_info.json + the file it names, read the way LLaMA-Factory reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mona_ray.core import records
from mona_ray.pipeline.export import write_trainer_files

# --------------------------------------------------------------------------- a faithful reader
# Follows LLaMA-Factory's src/llamafactory/data/parser.py (DatasetAttr defaults and join: when an
# entry has "columns"/"tags", every column/tag it does not name becomes None), loader.py (file_name
# is relative to dataset_dir; datasets gives every row every column, missing -> null),
# converter.py (AlpacaDatasetConverter, SharegptDatasetConverter) and processor/supervised.py
# (an example is dropped unless it has an odd number of prompt turns and exactly one response).

LF_ROLE = {"user": "user", "assistant": "assistant", "system": "system", "function": "function",
           "observation": "tool"}  # LLaMA-Factory's Role values -> ours (observation is a tool result)


def lf_read(run_dir: Path, name: str) -> list[tuple[str, list[tuple[str, str]], tuple[str, str]] | None]:
    """(system, prompt turns, response) per row of the registered file, None for a dropped row."""
    info = json.loads((run_dir / "dataset_info.json").read_text(encoding="utf-8"))
    attr = info[name]
    assert set(attr) <= {"file_name", "formatting", "columns", "tags"}
    cols = {"prompt": "instruction", "query": "input", "response": "output", "history": None,
            "messages": "conversations", "system": None}
    if "columns" in attr:
        assert set(attr["columns"]) <= set(cols)
        cols = {k: attr["columns"].get(k) for k in cols}
    tags = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
            "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
    if "tags" in attr:
        assert set(attr["tags"]) <= set(tags)
        tags = {k: attr["tags"].get(k) for k in tags}
    assert not Path(attr["file_name"]).is_absolute()
    lines = (run_dir / attr["file_name"]).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    keys = set().union(*rows)
    rows = [{k: r.get(k) for k in keys} for r in rows]
    formatting = attr.get("formatting", "alpaca")
    assert formatting in ("alpaca", "sharegpt")
    out = []
    for ex in rows:
        if formatting == "alpaca":
            prompt = []
            if cols["history"] and isinstance(ex[cols["history"]], list):
                for old_prompt, old_response in ex[cols["history"]]:
                    prompt += [("user", old_prompt), ("assistant", old_response)]
            query = []
            if cols["prompt"] and ex[cols["prompt"]]:
                query.append(ex[cols["prompt"]])
            if cols["query"] and ex[cols["query"]]:
                query.append(ex[cols["query"]])
            prompt.append(("user", "\n".join(query)))
            if cols["response"] and isinstance(ex[cols["response"]], str):
                response = [("assistant", ex[cols["response"]])]
            else:
                response = []
            system = ex[cols["system"]] if cols["system"] else ""
        else:
            mapping = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant",
                       tags["observation_tag"]: "observation", tags["function_tag"]: "function",
                       tags["system_tag"]: "system"}
            accept = ((tags["user_tag"], tags["observation_tag"]), (tags["assistant_tag"], tags["function_tag"]))
            messages = ex[cols["messages"]]
            rt, ct = tags["role_tag"], tags["content_tag"]
            if tags["system_tag"] and messages and messages[0][rt] == tags["system_tag"]:
                system, messages = messages[0][ct], messages[1:]
            else:
                system = ex[cols["system"]] if cols["system"] else ""
            aligned, broken = [], False
            for i, m in enumerate(messages):
                if m[rt] not in accept[i % 2]:
                    broken = True
                    break
                aligned.append((mapping[m[rt]], m[ct]))
            if len(aligned) % 2 != 0:
                broken = True
            prompt, response = ([], []) if broken else (aligned[:-1], aligned[-1:])
        if len(prompt) % 2 != 1 or len(response) != 1:
            out.append(None)
        else:
            out.append((system, [(LF_ROLE[r], c) for r, c in prompt], (LF_ROLE[response[0][0]], response[0][1])))
    return out


def want_from_messages(msgs: list[dict]):
    """(system, prompt turns, response) of normalised messages, as LLaMA-Factory should see them."""
    system = ""
    if msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"], msgs[1:]
    return system, [(m["role"], m["content"]) for m in msgs[:-1]], (msgs[-1]["role"], msgs[-1]["content"])


def selection(recs: list[dict]) -> list[dict]:
    """What the pipeline hands over: originals plus id, score, rank, best first."""
    return [{**r, "id": f"r{i}", "score": 0.9 - 0.01 * i, "rank": i + 1} for i, r in enumerate(recs)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_selected(out: Path, sel: list[dict]) -> None:  # as report.write_selection does
    (out / "selected.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sel),
                                        encoding="utf-8")


# --------------------------------------------------------------------------- data

ALPACA = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5", "system": "You are terse.", "source": "a"},
    {"instruction": "Résume ce texte.", "input": "Le café est chaud.", "output": "Café chaud.",
     "system": "", "source": "b"},
    {"instruction": "计算 7×8", "input": "", "output": "56", "system": "Answer in digits.", "source": "c"},
]

SHAREGPT = [  # OpenHermes-2.5 shape: from/value/weight turns, optional system turn, extra fields
    {"conversations": [{"from": "system", "value": "You are a math tutor.", "weight": None},
                       {"from": "human", "value": "What is 12*12?", "weight": None},
                       {"from": "gpt", "value": "144", "weight": None}],
     "source": "metamath", "category": "math"},
    {"conversations": [{"from": "human", "value": "Name a prime.", "weight": None},
                       {"from": "gpt", "value": "7", "weight": None},
                       {"from": "human", "value": "And an even one?", "weight": None},
                       {"from": "gpt", "value": "2", "weight": None}],
     "source": "airoboros2.2", "category": "general"},
    {"conversations": [{"from": "system", "value": "You can call get_time.", "weight": None},
                       {"from": "human", "value": "What time is it?", "weight": None},
                       {"from": "gpt", "value": "<functioncall> get_time {}", "weight": None},
                       {"from": "tool", "value": "{\"time\": \"12:00\"}", "weight": None},
                       {"from": "gpt", "value": "It is noon.", "weight": None}],
     "source": "glaive-code-assist", "category": "tool"},
]

MESSAGES = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris."}], "source": "x"},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "times 3?"}, {"role": "assistant", "content": "12"}], "source": "y"},
]


# --------------------------------------------------------------------------- single formats


def test_alpaca_registers_selected_jsonl_with_its_columns(tmp_path):
    sel = selection(ALPACA)
    write_selected(tmp_path, sel)
    res = write_trainer_files(sel, tmp_path)
    assert res["file"] == "selected.jsonl" and res["formatting"] == "alpaca" and res["source_format"] == "alpaca"
    assert res["dataset"] == "mona_selected" and res["dataset_info"] == "dataset_info.json"
    entry = json.loads((tmp_path / "dataset_info.json").read_text(encoding="utf-8"))["mona_selected"]
    assert entry["columns"] == {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}
    got = lf_read(tmp_path, "mona_selected")
    want = [(r["system"], [("user", "\n".join(x for x in (r["instruction"], r["input"]) if x))], ("assistant", r["output"]))
            for r in ALPACA]
    assert got == want
    assert got[1][1] == [("user", "Résume ce texte.\nLe café est chaud.")]
    # the TRL file is there too, with the messages the selection was scored on
    assert [r["messages"] for r in read_jsonl(tmp_path / "selected.messages.jsonl")] == \
        [records.normalize_record(r) for r in ALPACA]


def test_alpaca_without_system_or_input_fields_registers_only_what_is_there(tmp_path):
    recs = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say bye", "output": "bye"}]
    sel = selection(recs)
    write_selected(tmp_path, sel)
    res = write_trainer_files(sel, tmp_path, dataset_name="my_sel")
    entry = json.loads((tmp_path / "dataset_info.json").read_text(encoding="utf-8"))
    assert list(entry) == ["my_sel"] and res["dataset"] == "my_sel"
    assert entry["my_sel"]["columns"] == {"prompt": "instruction", "response": "output"}
    assert lf_read(tmp_path, "my_sel") == [("", [("user", "Say hi")], ("assistant", "hi")),
                                          ("", [("user", "Say bye")], ("assistant", "bye"))]


def test_openhermes_sharegpt_registers_selected_jsonl_with_its_tags(tmp_path):
    sel = selection(SHAREGPT)
    write_selected(tmp_path, sel)
    res = write_trainer_files(sel, tmp_path)
    assert res["file"] == "selected.jsonl" and res["formatting"] == "sharegpt", res["reason"]
    entry = json.loads((tmp_path / "dataset_info.json").read_text(encoding="utf-8"))["mona_selected"]
    assert entry["columns"] == {"messages": "conversations"}
    assert entry["tags"] == {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                             "system_tag": "system", "observation_tag": "tool"}
    got = lf_read(tmp_path, "mona_selected")
    assert got == [want_from_messages(records.normalize_record(r)) for r in SHAREGPT]
    assert got[0][0] == "You are a math tutor." and got[1][0] == ""
    assert got[2][1][-1] == ("tool", "{\"time\": \"12:00\"}")


def test_chat_messages_register_selected_jsonl_with_role_content_tags(tmp_path):
    sel = selection(MESSAGES)
    write_selected(tmp_path, sel)
    res = write_trainer_files(sel, tmp_path)
    assert res["file"] == "selected.jsonl" and res["formatting"] == "sharegpt" and res["source_format"] == "messages"
    entry = json.loads((tmp_path / "dataset_info.json").read_text(encoding="utf-8"))["mona_selected"]
    assert entry["columns"] == {"messages": "messages"}
    assert entry["tags"] == {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                             "assistant_tag": "assistant", "system_tag": "system"}
    assert lf_read(tmp_path, "mona_selected") == [want_from_messages(records.normalize_record(r)) for r in MESSAGES]


# --------------------------------------------------------------------------- the messages file


def test_mixed_formats_train_on_the_messages_file(tmp_path):
    recs = [ALPACA[1], SHAREGPT[2], MESSAGES[0], ALPACA[0], SHAREGPT[0]]
    sel = selection(recs)
    write_selected(tmp_path, sel)
    res = write_trainer_files(sel, tmp_path)
    assert res["file"] == "selected.messages.jsonl" and res["formatting"] == "sharegpt"
    assert res["source_format"] == "mixed" and "mixed formats" in res["reason"]
    assert "alpaca 2" in res["reason"] and "sharegpt 2" in res["reason"] and "messages 1" in res["reason"]
    rows = read_jsonl(tmp_path / "selected.messages.jsonl")
    assert [r["messages"] for r in rows] == [records.normalize_record(r) for r in recs]
    assert [(r["id"], r["score"], r["rank"]) for r in rows] == [(s["id"], s["score"], s["rank"]) for s in sel]
    assert all(set(r) == {"messages", "id", "score", "rank"} for r in rows)
    assert lf_read(tmp_path, "mona_selected") == [want_from_messages(records.normalize_record(r)) for r in recs]
    assert res["not_trainable_count"] == 0 and res["rows"] == len(recs)
    # UTF-8 as is, and no temporary file left behind
    raw = (tmp_path / "selected.messages.jsonl").read_bytes()
    assert "Résume".encode() in raw and b"\\u00e9" not in raw
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset_info.json", "selected.jsonl",
                                                         "selected.messages.jsonl"]


def test_messages_setting_forces_the_messages_file(tmp_path):
    sel = selection(ALPACA)
    res = write_trainer_files(sel, tmp_path, fmt="messages")
    assert res["file"] == "selected.messages.jsonl" and "report.trainer_format=messages" in res["reason"]
    assert res["source_format"] == "alpaca"
    assert [r["messages"] for r in read_jsonl(tmp_path / "selected.messages.jsonl")] == \
        [records.normalize_record(r) for r in ALPACA]
    # normalize_record joins instruction and input with a blank line and has no system prompt
    assert lf_read(tmp_path, "mona_selected")[1] == ("", [("user", "Résume ce texte.\n\nLe café est chaud.")],
                                                     ("assistant", "Café chaud."))


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "", None, "Messages"])
def test_unknown_setting_is_refused_with_its_name(tmp_path, fmt):
    with pytest.raises(ValueError, match=r"report\.trainer_format=.*auto, messages"):
        write_trainer_files(selection(ALPACA), tmp_path, fmt=fmt)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- falling back


def test_roles_that_do_not_alternate_fall_back_and_are_reported(tmp_path):
    broken = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hello?"},
                                {"from": "gpt", "value": "Hi!"}], "source": "s", "category": "c"}
    recs = [SHAREGPT[1], broken]
    sel = selection([{**r, "conversations": [{k: v for k, v in t.items() if k != "weight"}
                                             for t in r["conversations"]]} for r in recs])
    write_selected(tmp_path, sel)
    res = write_trainer_files(sel, tmp_path)
    assert res["file"] == "selected.messages.jsonl"
    assert "'r1' would be skipped by LLaMA-Factory" in res["reason"] and "alternate" in res["reason"]
    # both records are in the TRL file; LLaMA-Factory drops the broken one, and the result says so
    rows = read_jsonl(tmp_path / "selected.messages.jsonl")
    assert [r["messages"] for r in rows] == [records.normalize_record(r) for r in recs]
    assert res["not_trainable_count"] == 1 and res["not_trainable"][0]["id"] == "r1"
    assert "turn 2 is 'user'" in res["not_trainable"][0]["reason"]
    assert lf_read(tmp_path, "mona_selected") == [want_from_messages(records.normalize_record(recs[0])), None]


@pytest.mark.parametrize("turns, why", [
    ([("human", "q"), ("gpt", "a"), ("human", "more?")], "3 turn(s)"),  # ends with the user
    ([("human", "q"), ("gpt", "a"), ("system", "late system"), ("gpt", "b")], "turn 3 is 'system'"),
    ([("gpt", "I start"), ("human", "ok")], "turn 1 is 'gpt'"),
    ([("system", "only a system prompt"), ("human", "q")], "1 turn(s)"),
])
def test_shapes_llama_factory_skips_are_not_registered_natively(tmp_path, turns, why):
    rec = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    sel = selection([rec])
    write_selected(tmp_path, sel)
    res = write_trainer_files(sel, tmp_path)
    assert res["file"] == "selected.messages.jsonl", res
    assert why in res["reason"]  # in the file's own role names
    assert res["not_trainable_count"] == 1  # in the messages file's role names
    assert why.replace("'gpt'", "'assistant'") in res["not_trainable"][0]["reason"]
    assert lf_read(tmp_path, "mona_selected") == [None]


def test_role_spelled_two_ways_falls_back_and_trains_everything(tmp_path):
    recs = [{"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}]},
            {"conversations": [{"from": "user", "value": "q2"}, {"from": "assistant", "value": "a2"}]}]
    sel = selection(recs)
    write_selected(tmp_path, sel)
    res = write_trainer_files(sel, tmp_path)
    assert res["file"] == "selected.messages.jsonl"
    assert "role names vary" in res["reason"] and "'human', 'user'" in res["reason"]
    assert lf_read(tmp_path, "mona_selected") == [("", [("user", "q1")], ("assistant", "a1")),
                                                  ("", [("user", "q2")], ("assistant", "a2"))]


def test_records_whose_fields_differ_fall_back(tmp_path):
    recs = [dict(ALPACA[0]), {**ALPACA[2], "category": "math"}]
    sel = selection(recs)
    write_selected(tmp_path, sel)
    res = write_trainer_files(sel, tmp_path)
    assert res["file"] == "selected.messages.jsonl" and "fields or their types differ" in res["reason"]
    assert lf_read(tmp_path, "mona_selected") == [want_from_messages(records.normalize_record(r)) for r in recs]
    # a null, or a number, where another record has a string is a different type too
    for other in ({**ALPACA[2], "input": None}, {**ALPACA[2], "source": 3}):
        sel = selection([ALPACA[0], other])
        write_selected(tmp_path, sel)
        assert "fields or their types differ" in write_trainer_files(sel, tmp_path)["reason"]
    sel = selection([ALPACA[0], ALPACA[2]])
    write_selected(tmp_path, sel)
    assert write_trainer_files(sel, tmp_path)["file"] == "selected.jsonl"


def test_a_record_in_no_format_is_reported_and_left_out(tmp_path):
    sel = selection([ALPACA[0], ALPACA[2]])
    sel.insert(1, {"record": ["not", "an", "object"], "id": "odd", "score": 0.5, "rank": 2})
    res = write_trainer_files(sel, tmp_path)
    assert res["file"] == "selected.messages.jsonl" and res["rows"] == 2
    assert res["not_trainable"] == [{"id": "odd", "reason": res["not_trainable"][0]["reason"]}]
    assert "unknown record format" in res["not_trainable"][0]["reason"]
    assert [r["id"] for r in read_jsonl(tmp_path / "selected.messages.jsonl")] == ["r0", "r1"]


def test_without_selected_jsonl_the_registry_names_the_messages_file(tmp_path):
    res = write_trainer_files(selection(MESSAGES), tmp_path)
    assert res["file"] == "selected.messages.jsonl" and "selected.jsonl is not in" in res["reason"]


def test_an_empty_selection_writes_empty_files(tmp_path):
    res = write_trainer_files([], tmp_path)
    assert res["file"] == "selected.messages.jsonl" and res["rows"] == 0 and "no records" in res["reason"]
    assert (tmp_path / "selected.messages.jsonl").read_text(encoding="utf-8") == ""


def test_rewrites_replace_the_previous_files(tmp_path):
    write_trainer_files(selection(ALPACA + MESSAGES), tmp_path)
    sel = selection(MESSAGES)
    write_selected(tmp_path, sel)
    res = write_trainer_files(sel, tmp_path)
    assert res["file"] == "selected.jsonl"
    assert len(read_jsonl(tmp_path / "selected.messages.jsonl")) == len(MESSAGES)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
