"""engine.data: readers, format detection, validation with line numbers, token statistics, CLI.

Every input file is written by the test into tmp_path; the public demo datasets are read
through the ``shared_datasets`` fixture (skipped when absent).
"""

from __future__ import annotations

import argparse
import codecs
import csv
import importlib
import json
import random
import sys
from pathlib import Path

import pytest

from engine import data, templates
from engine.config import DataConfig
from engine.data import DataError, Problem, load_for_training, load_records, split_records, token_stats

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "datasets"


def chat(q="What is 2 + 3?", a="5."):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write_jsonl(path: Path, rows, newline="\n", encoding="utf-8") -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_bytes((newline.join(lines) + newline).encode(encoding))
    return path


def write_csv(path: Path, header, rows, delimiter=",", newline="\n") -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter, lineterminator=newline)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# --------------------------------------------------------------------------- readers


def test_jsonl_openai_string_and_text_parts(tmp_path):
    parts = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hi!"}]},
        ]
    }
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(), "", parts])
    result = load_records(path)
    assert result.format == "openai" and result.source == "jsonl"
    assert result.total == 2 and result.skipped == 0 and result.problems == []
    assert result.records[0] == [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5."},
    ]
    assert result.records[1][1] == {"role": "user", "content": "Hello\nthere"}
    assert result.records[1][2]["content"] == "Hi!"
    assert result.counts["messages"]["system"] == 1


def test_json_array_object_with_array_and_single_object(tmp_path):
    rows = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}] * 3
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "b.json").write_text(json.dumps({"version": 1, "data": rows}))
    (tmp_path / "c.json").write_text(json.dumps(chat()))
    a = load_records(tmp_path / "a.json")
    b = load_records(tmp_path / "b.json")
    c = load_records(tmp_path / "c.json")
    assert (a.format, len(a.records)) == ("alpaca", 3)
    assert (b.format, len(b.records)) == ("alpaca", 3)
    assert (c.format, len(c.records)) == ("openai", 1)
    assert a.records == b.records


def test_json_file_holding_json_lines_is_read_with_a_warning(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", [chat(), chat("Hi", "Hello")])
    result = load_records(path)
    assert len(result.records) == 2
    assert any("JSON Lines" in w for w in result.warnings)


@pytest.mark.parametrize(
    "bom,encoding",
    [
        (b"", "utf-8"),
        (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"),
        (codecs.BOM_UTF16_BE, "utf-16-be"),
    ],
    ids=["utf8", "utf8-bom", "utf16le-bom", "utf16be-bom"],
)
@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_encodings_and_line_ends(tmp_path, bom, encoding, newline):
    rows = [chat("Café?", "Oui, café ☕."), chat(), "not json"]
    text = newline.join(json.dumps(r, ensure_ascii=False) if isinstance(r, dict) else r for r in rows) + newline
    path = tmp_path / "enc.jsonl"
    path.write_bytes(bom + text.encode(encoding))
    result = load_records(path)
    assert result.records[0][0]["content"] == "Café?"
    assert result.records[0][1]["content"] == "Oui, café ☕."
    assert [str(p) for p in result.problems] == ["enc.jsonl, line 3: invalid JSON: Expecting value (column 1)"]
    assert not any("\r" in m["content"] for r in result.records for m in r)

    csv_path = tmp_path / "enc.csv"
    csv_text = newline.join(["question,answer", "Café?,Oui", '"Two, lines?","Yes' + newline + 'really"']) + newline
    csv_path.write_bytes(bom + csv_text.encode(encoding))
    csv_result = load_records(csv_path)
    assert csv_result.format == "qa"
    assert csv_result.records[0][0]["content"] == "Café?"
    assert csv_result.records[1][1]["content"].splitlines() == ["Yes", "really"]


def test_csv_and_tsv_question_answer(tmp_path):
    csv_path = write_csv(
        tmp_path / "qa.csv", ["Question", "Answer"], [["What, exactly?", 'He said "hi".'], ["Q2", "A2"]]
    )
    tsv_path = write_csv(tmp_path / "qa.tsv", ["prompt", "completion"], [["P1", "C1"], ["P2", "C2"]], delimiter="\t")
    a = load_records(csv_path)
    b = load_records(tsv_path)
    assert a.format == b.format == "qa"
    assert a.records[0] == [
        {"role": "user", "content": "What, exactly?"},
        {"role": "assistant", "content": 'He said "hi".'},
    ]
    assert b.records[1] == [{"role": "user", "content": "P2"}, {"role": "assistant", "content": "C2"}]


def test_csv_column_holding_messages_as_json(tmp_path):
    path = write_csv(tmp_path / "m.csv", ["messages"], [[json.dumps(chat()["messages"])], ["[not json"]])
    result = load_records(path)
    assert result.format == "openai" and result.records[0] == chat()["messages"]
    assert [str(p) for p in result.problems] == [
        "m.csv, row 3, field 'messages': invalid JSON: Expecting value (column 2)"
    ]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([chat(), chat("Hi", "Hello"), {"messages": [{"role": "user", "content": "x"}]}])
    pq.write_table(table, tmp_path / "chat.parquet")
    result = load_records(tmp_path / "chat.parquet")
    assert result.source == "parquet" and result.format == "openai"
    assert len(result.records) == 2
    assert [str(p) for p in result.problems] == [
        "chat.parquet, row 3, field 'messages': has no assistant turn, so there is nothing to learn"
    ]


def test_saved_dataset_directory(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"question": "Q1", "answer": "A1"}, {"question": "Q2", "answer": "A2"}]).save_to_disk(
        str(tmp_path / "single")
    )
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([chat(), chat("Hi", "Hello")]),
            "test": datasets.Dataset.from_list([chat()]),
        }
    ).save_to_disk(str(tmp_path / "dict"))
    single = load_records(tmp_path / "single")
    assert (single.source, single.format, len(single.records)) == ("disk", "qa", 2)
    split = load_records(tmp_path / "dict")
    assert (split.format, len(split.records)) == ("openai", 2)
    assert any("'train'" in w for w in split.warnings)


def test_hub_id_without_network_is_a_clear_data_error():
    with pytest.raises(DataError) as err:
        load_records("tunelab-nobody/no-such-dataset")
    message = str(err.value)
    assert "tunelab-nobody/no-such-dataset" in message and "Hub" in message
    assert "Traceback" not in message


# --------------------------------------------------------------------------- formats


def test_sharegpt_with_system_tools_and_tool_turns(tmp_path):
    tools = [{"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    record = {
        "system": "You are helpful.",
        "tools": json.dumps(tools),
        "conversations": [
            {"from": "human", "value": "Weather in Oslo?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
            {"from": "observation", "value": '{"temp": 3}'},
            {"from": "gpt", "value": "It is 3 degrees."},
        ],
    }
    result = load_records(write_jsonl(tmp_path / "tools.jsonl", [record]))
    assert result.format == "sharegpt"
    messages = result.records[0]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[0]["content"].startswith("You are helpful.")
    assert '"weather"' in messages[0]["content"]
    assert messages[2]["content"] == '{"name": "weather", "arguments": {"city": "Oslo"}}'
    assert result.counts["tool_calls"] == 1 and result.counts["tool_results"] == 1


def test_openai_tool_calls(tmp_path):
    record = {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}],
            },
            {"role": "tool", "content": '{"temp": 3}'},
            {"role": "assistant", "content": "3 degrees."},
        ],
        "tools": [{"type": "function", "function": {"name": "weather"}}],
    }
    result = load_records(write_jsonl(tmp_path / "oa.jsonl", [record]))
    messages = result.records[0]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert json.loads(messages[2]["content"]) == {"name": "weather", "arguments": {"city": "Oslo"}}
    assert result.counts["tool_calls"] == 1


def test_reasoning_content_is_kept_as_a_think_block(tmp_path, tokenizer):
    """An answer's separate reasoning field stays with it, written as <think>...</think>
    (which Qwen3's template reads back out); an answer that already holds its reasoning is
    left as it is."""
    records = [
        {
            "messages": [
                {"role": "user", "content": "2 + 3?"},
                {"role": "assistant", "content": "5.", "reasoning_content": "Two plus three.\n"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "4 + 4?"},
                {
                    "role": "assistant",
                    "content": "<think>\nFour and four.\n</think>\n\n8.",
                    "reasoning_content": "ignored: the answer has its own",
                },
            ]
        },
    ]
    result = load_records(write_jsonl(tmp_path / "reasoning.jsonl", records))
    assert result.records[0][-1]["content"] == "<think>\nTwo plus three.\n</think>\n\n5."
    assert result.records[1][-1]["content"] == "<think>\nFour and four.\n</think>\n\n8."
    qwen3 = (Path(__import__("trl").__file__).parent / "chat_templates" / "qwen3.jinja").read_text()
    text, spans = templates.assistant_spans(result.records[0], tokenizer, qwen3)
    assert text[spans[0][0] : spans[0][1]] == "<think>\nTwo plus three.\n</think>\n\n5.<|im_end|>"


def test_alpaca_with_input_system_and_history(tmp_path):
    record = {
        "instruction": "Translate to French.",
        "input": "cat",
        "output": "chat",
        "system": "You translate.",
        "history": [["Translate to French: dog", "chien"]],
    }
    result = load_records(write_jsonl(tmp_path / "alpaca.jsonl", [record, {"instruction": "Say hi.", "output": "Hi"}]))
    assert result.format == "alpaca"
    assert result.records[0] == [
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": "Translate to French: dog"},
        {"role": "assistant", "content": "chien"},
        {"role": "user", "content": "Translate to French.\ncat"},
        {"role": "assistant", "content": "chat"},
    ]
    assert result.records[1] == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi"}]


@pytest.mark.parametrize(
    "q,a", [("question", "answer"), ("prompt", "completion"), ("query", "response"), ("input", "output")]
)
def test_question_answer_column_pairs(tmp_path, q, a):
    result = load_records(write_jsonl(tmp_path / "qa.jsonl", [{q: "Q?", a: "A."}]))
    assert result.format == "qa"
    assert result.records[0] == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]


def test_context_question_answer_csv(tmp_path):
    path = write_csv(
        tmp_path / "ctx.csv", ["context", "question", "answer"], [["The sky is green here.", "Sky colour?", "Green."]]
    )
    result = load_records(path)
    assert result.format == "qa"
    assert result.records[0][0] == {"role": "user", "content": "The sky is green here.\n\nSky colour?"}


def test_preference_is_recognised_and_refused_for_training(tmp_path):
    rows = [
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
        {
            "conversations": [{"from": "human", "value": "Hello"}],
            "chosen": {"from": "gpt", "value": "Hi there"},
            "rejected": {"from": "gpt", "value": "Go away"},
        },
    ]
    path = write_jsonl(tmp_path / "pref.jsonl", rows)
    result = load_records(path)
    assert result.format == "preference" and result.is_preference
    assert result.pairs[0] == {
        "prompt": [{"role": "user", "content": "Say hi."}],
        "chosen": [{"role": "assistant", "content": "Hi!"}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }
    assert result.records[1][-1] == {"role": "assistant", "content": "Hi there"}
    assert result.stages == ("dpo", "kto", "orpo")
    with pytest.raises(DataError, match=r"preference data .*trains stage dpo or kto or orpo, not sft: set training"):
        load_for_training(DataConfig(path=str(path)))
    _, train, val = load_for_training(DataConfig(path=str(path), validation_split=0.0), stage="dpo")
    assert train == result.pairs and val == []


def test_unpaired_kto_records_and_their_problems_by_line(tmp_path):
    rows = [
        {"prompt": "Say hi.", "completion": "Hi!", "label": True},
        {"prompt": [{"role": "user", "content": "Hello"}], "completion": "Go away", "label": "false"},
        {"prompt": "Say hi.", "completion": "", "label": True},
        {"prompt": "Say hi.", "completion": "Hi.", "label": "maybe"},
        {"prompt": "Say hi.", "completion": "Hi.", "label": 1},
    ]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    result = load_records(path)
    assert result.format == "unpaired" and result.stages == ("kto",)
    assert [p["label"] for p in result.pairs] == [True, False, True]
    assert result.pairs[1]["completion"] == [{"role": "assistant", "content": "Go away"}]
    assert [(p.record, p.field) for p in result.problems] == [(3, "completion"), (4, "label")]
    assert "kto.jsonl, line 4, field 'label': must be true or false" in str(result.problems[1])
    for stage in ("sft", "dpo", "orpo"):
        with pytest.raises(DataError, match=f"unpaired preference data .*trains stage kto, not {stage}"):
            load_for_training(DataConfig(path=str(path)), stage=stage)
    assert len(load_for_training(DataConfig(path=str(path), validation_split=0.0), stage="kto")[1]) == 3


def test_bad_preference_records_are_reported_by_line_and_field(tmp_path):
    rows = [
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
        {"prompt": "Say hi.", "chosen": "", "rejected": "No."},
        {"prompt": "Say hi.", "chosen": "Hi!"},
        {
            "conversations": [{"from": "human", "value": "Hi"}],
            "chosen": {"from": "human", "value": "x"},
            "rejected": "y",
        },
        {"messages": [{"role": "user", "content": "Hi"}], "chosen": "Hello", "rejected": 5},
        {
            "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
            "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "B"}],
        },
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = load_records(path)
    assert result.format == "preference" and len(result.pairs) == 2
    assert result.pairs[1]["prompt"] == [{"role": "user", "content": "Q"}]
    where = [(p.record, p.field) for p in result.problems]
    assert where[:2] == [(2, "chosen"), (3, None)] and where[2][0] == 4 and where[3] == (5, "rejected")
    assert all(str(p).startswith(f"pairs.jsonl, line {p.record}") for p in result.problems)
    with pytest.raises(DataError, match="pairs.jsonl, line 2, field 'chosen': is empty"):
        load_for_training(DataConfig(path=str(path), on_error="stop"), stage="dpo")


def test_format_override(tmp_path):
    path = write_jsonl(tmp_path / "io.jsonl", [{"instruction": "Say hi.", "input": "to Bob", "output": "Hi Bob"}])
    as_alpaca = load_records(path)
    as_qa = load_records(path, format="qa")
    assert as_alpaca.format == "alpaca" and as_alpaca.format_detected
    assert as_qa.format == "qa" and not as_qa.format_detected
    assert as_qa.records[0][0]["content"] == "to Bob"  # input/output pair
    with pytest.raises(DataError) as err:
        load_records(path, format="sharegpt")
    assert "field 'conversations': is missing" in str(err.value)


def test_persona_placeholders_and_system_prompt(tmp_path):
    rows = [{"instruction": "Who are you?", "output": "I am {{name}}, made by {{ author }}."}]
    path = write_jsonl(tmp_path / "id.jsonl", rows)
    raw = load_records(path)
    assert raw.records[0][1]["content"] == "I am {{name}}, made by {{ author }}."
    assert raw.placeholders == ["author", "name"]
    assert any("{{name}}" in w for w in raw.warnings)
    filled = load_records(path, persona={"name": "Pip", "author": "tunelab"}, system_prompt="Be Pip.")
    assert filled.records[0] == [
        {"role": "system", "content": "Be Pip."},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am Pip, made by tunelab."},
    ]
    assert not any("placeholders" in w for w in filled.warnings)
    partly = load_records(path, persona={"name": "Pip"})
    assert partly.records[0][1]["content"] == "I am Pip, made by {{ author }}."
    assert any("{{author}}" in w for w in partly.warnings)


# --------------------------------------------------------------------------- validation


def test_every_record_problem_names_file_record_and_field(tmp_path):
    rows = [
        chat(),  # 1 fine
        '{"messages": [',  # 2 invalid JSON
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},  # 3 missing content
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]},  # 4 empty
        {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "x"}]},  # 5 unknown role
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "q2"},
            ]
        },  # 6
        {"question": "q", "answer": "a"},  # 7 another format
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                {"role": "assistant", "content": "a"},
            ]
        },  # 8 non-text part
        {"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "a"}]},  # 9 non-text value
        [1, 2],  # 10 not an object
        {"messages": []},  # 11 no turns
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "a"},
            ]
        },  # 12
    ]
    result = load_records(write_jsonl(tmp_path / "data.jsonl", rows))
    assert result.total == 12 and len(result.records) == 1 and result.skipped == 11
    got = [str(p) for p in result.problems]
    assert got == [
        "data.jsonl, line 2: invalid JSON: Expecting value (column 15)",
        "data.jsonl, line 3, field 'messages[0].content': is missing",
        "data.jsonl, line 4, field 'messages[0].content': is empty",
        "data.jsonl, line 5, field 'messages[1].role': unknown role 'robot' "
        "(known: assistant, developer, function, ipython, system, tool, user)",
        "data.jsonl, line 6, field 'messages[2]': the conversation ends with 'user'; it must end with the assistant",
        "data.jsonl, line 7: is a record in qa format, unlike the rest of the file (openai)",
        "data.jsonl, line 8, field 'messages[0].content[0]': non-text content ('image_url') is not supported; "
        "only text can be trained",
        "data.jsonl, line 9, field 'messages[0].content': non-text content: expected text, got number",
        "data.jsonl, line 10: expected a JSON object, got array",
        "data.jsonl, line 11, field 'messages': is empty (no turns)",
        "data.jsonl, line 12, field 'messages[1]': a system message may only come first",
    ]
    p = result.problems[1]
    assert (p.file, p.unit, p.record, p.field) == ("data.jsonl", "line", 3, "messages[0].content")
    assert p.to_dict()["text"] == got[1]


def test_json_array_problems_give_index_and_line(tmp_path):
    rows = [
        {"instruction": "a", "output": "b"},
        {"instruction": "c", "output": ""},
        {"instruction": "d", "output": ["not", "text"]},
    ]
    path = tmp_path / "arr.json"
    path.write_text(json.dumps(rows, indent=2))
    result = load_records(path)
    assert [str(p) for p in result.problems] == [
        "arr.json, record 2 (line 6), field 'output': is empty",
        "arr.json, record 3 (line 10), field 'output': non-text content: expected text, got array",
    ]


def test_csv_row_problems(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("question,answer\nQ1,A1\nQ2,\nQ3,A3,extra\n\nQ5,A5\n")
    result = load_records(path)
    assert [str(p) for p in result.problems] == [
        "rows.csv, row 3, field 'answer': is empty",
        "rows.csv, row 4: has 3 fields but the header has 2 (question, answer)",
    ]
    assert len(result.records) == 2


def test_on_error_stop_raises_with_every_problem(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(), "{bad", {"messages": [{"role": "user", "content": "q"}]}])
    skipped = load_records(path, on_error="skip")
    assert skipped.skipped == 2 and len(skipped.problems) == 2
    with pytest.raises(DataError) as err:
        load_records(path, on_error="stop")
    assert len(err.value.problems) == 2
    assert "2 of 3 records have problems" in str(err.value)
    assert "d.jsonl, line 2: invalid JSON" in str(err.value)


def test_no_usable_record_is_a_data_error(tmp_path):
    path = write_jsonl(tmp_path / "none.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(DataError, match="none of the 1 records is usable"):
        load_records(path)
    with pytest.raises(DataError, match="no record matches a known format.*keys of the first record: text"):
        load_records(write_jsonl(tmp_path / "text.jsonl", [{"text": "plain"}]))


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.jsonl", b"", "empty.jsonl: is empty"),
        ("blank.jsonl", b"  \n\n", "blank.jsonl: is empty (only white space)"),
        ("binary.jsonl", bytes(range(256)) * 4, "binary.jsonl: looks like a binary file"),
        ("latin1.jsonl", '{"question": "café"}'.encode("latin-1"), "latin1.jsonl, line 1: is not valid utf-8 text"),
        ("notes.txt", b"hello", "notes.txt: has an unknown extension '.txt'"),
        ("cut.json", b'[\n  {"a": 1},\n  {"a": ', "cut.json, line 3: invalid JSON: Expecting value (column 9)"),
        (
            "scalar.json",
            b"42",
            "scalar.json: must hold an array of records or an object holding one, not a JSON number",
        ),
        ("obj.json", b'{"name": "x"}', "obj.json: is a JSON object without an array of records (keys: name)"),
        ("noarray.json", b"[]", "noarray.json: holds no records"),
        ("header.csv", b",\nq,a\n", "header.csv, row 1: the header (row 1) holds no column names"),
        ("dup.csv", b"q,q\n1,2\n", "dup.csv, row 1: the header repeats column names: q"),
        ("deep.json", b"[" * 100000, "deep.json"),
        ("fake.parquet", b"PAR1 but not really", "fake.parquet: is not a readable Parquet file"),
        ("real.jsonl", b"PAR1\x00\x01", "real.jsonl: is a Parquet file"),
    ],
)
def test_file_level_failures_give_one_clear_message(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_records(path)
    assert str(err.value).startswith(message)


def test_size_limit_missing_file_and_plain_directory(tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", [chat()] * 10)
    with pytest.raises(DataError, match=r"big.jsonl: is .* over the limit of 100 B"):
        load_records(path, max_bytes=100)
    assert len(load_records(path, max_bytes=10_000).records) == 10
    with pytest.raises(DataError, match="missing.jsonl: not found"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="not a dataset saved by datasets.save_to_disk"):
        load_records(tmp_path / "folder")
    with pytest.raises(DataError, match="Unknown data format"):
        load_records(path, format="xml")


def test_fuzz_random_bytes_raise_only_data_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([chat()] * 3), tmp_path / "seed.parquet")
    long_text = "x" * 40
    seeds = [
        (".jsonl", (json.dumps(chat(long_text, long_text)) + "\n") * 3),
        (".csv", f"question,answer\n{long_text},{long_text}\n" * 3),
        (".json", json.dumps([{"instruction": long_text, "output": long_text}] * 3, indent=1)),
        (".tsv", codecs.BOM_UTF16_LE + f"question\tanswer\n{long_text}\t{long_text}\n".encode("utf-16-le")),
        (".parquet", (tmp_path / "seed.parquet").read_bytes()),
    ]
    rng = random.Random(1234)
    outcomes = {"ok": 0, "error": 0}
    for i in range(300):
        ext, seed = rng.choice(seeds)
        base = bytearray(seed.encode() if isinstance(seed, str) else seed)
        mode = rng.random()
        if mode < 0.2:  # pure noise
            blob = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
        elif mode < 0.7:  # flip a few bytes of a valid file
            for _ in range(rng.randint(1, 3)):
                base[rng.randrange(len(base))] = rng.getrandbits(8)
            blob = bytes(base)
        else:  # cut a valid file and append structure characters
            alphabet = b'{}[],:"\\\n\r\t abc,\x00\xff\xfe'
            blob = bytes(base[: rng.randrange(len(base))]) + bytes(
                rng.choice(alphabet) for _ in range(rng.randint(0, 60))
            )
        path = tmp_path / f"fuzz{i}{ext}"
        path.write_bytes(blob)
        try:
            result = load_records(path)
            assert result.records
            outcomes["ok"] += 1
        except DataError as err:
            assert str(err)
            outcomes["error"] += 1
    assert outcomes["error"] > 0 and outcomes["ok"] > 0


def _random_json(rng: random.Random, depth: int = 0):
    keys = [
        "messages",
        "conversations",
        "role",
        "content",
        "from",
        "value",
        "instruction",
        "input",
        "output",
        "question",
        "answer",
        "chosen",
        "rejected",
        "prompt",
        "system",
        "tools",
        "history",
        "tool_calls",
        "type",
        "text",
        "function",
        "name",
        "arguments",
        "context",
    ]
    roll = rng.random()
    if depth > 4 or roll < 0.25:
        return rng.choice(
            [
                None,
                True,
                1,
                2.5,
                float("nan"),
                "",
                "x",
                "user",
                "assistant",
                "gpt",
                "human",
                "function_call",
                "observation",
                "{{name}}",
                "[1,",
                '{"a": 1}',
                "text",
                "image_url",
            ]
        )
    if roll < 0.55:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def test_fuzz_random_structures_raise_only_data_error(tmp_path):
    rng = random.Random(99)
    for i in range(60):
        rows = [_random_json(rng) for _ in range(rng.randint(1, 12))]
        rows.append(chat())  # one good record, so most files load
        path = tmp_path / f"s{i}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
        for fmt in ("auto",) + data.FORMATS:
            try:
                result = load_records(path, format=fmt, persona={"name": "Pip"})
            except DataError as err:
                assert all(isinstance(p, Problem) for p in err.problems)
                continue
            for record in result.records:
                assert record[-1]["role"] == "assistant"
                assert all(m["role"] in data.ROLES and isinstance(m["content"], str) for m in record)


# --------------------------------------------------------------------------- split and training config


def test_split_is_seeded_disjoint_and_complete():
    records = [[{"role": "user", "content": str(i)}] for i in range(50)]
    train, val = split_records(records, 0.2, seed=1)
    again = split_records(records, 0.2, seed=1)
    other = split_records(records, 0.2, seed=2)
    assert (len(train), len(val)) == (40, 10)
    assert (train, val) == again
    assert val != other[1]
    ids = sorted(int(r[0]["content"]) for r in train + val)
    assert ids == list(range(50))
    assert split_records(records, 0.0, 1) == (records, [])
    assert [len(x) for x in split_records(records[:2], 0.01, 1)] == [1, 1]
    assert split_records(records[:1], 0.5, 1) == (records[:1], [])


def test_load_for_training_applies_max_records_and_split(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chat(f"q{i}", f"a{i}") for i in range(30)] + ["{oops"])
    cfg = DataConfig(path=str(path), validation_split=0.1, max_records=20, seed=3)
    result, train, val = load_for_training(cfg)
    assert (len(train), len(val)) == (18, 2)
    assert result.skipped == 1
    with pytest.raises(DataError):
        load_for_training(DataConfig(path=str(path), on_error="stop"))
    with pytest.raises(DataError, match="data.path is empty"):
        load_for_training(DataConfig())


# --------------------------------------------------------------------------- token statistics


def test_token_stats_counts_and_assistant_mask(tokenizer):
    own = tokenizer.chat_template  # SmolLM2's own ChatML template
    records = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Count to three."},
            {"role": "assistant", "content": "One, two, three."},
            {"role": "user", "content": "Again?"},
            {"role": "assistant", "content": "One, two, three."},
        ],
    ]
    stats = token_stats(records, tokenizer, max_length=1024)
    lengths = [
        len(tokenizer.apply_chat_template(r, chat_template=own, tokenize=True, return_dict=True)["input_ids"])
        for r in records
    ]
    assert stats["template"] == "a ChatML template (tokenizer)"
    assert stats["records"] == 2
    assert stats["tokens"]["min"] == min(lengths) and stats["tokens"]["max"] == max(lengths)
    assert stats["tokens"]["total"] == sum(lengths)
    assert stats["turns"]["total"] == 2 + 4
    # trained tokens are exactly each answer followed by <|im_end|>
    answers = ["Hello there", "One, two, three.", "One, two, three."]
    expected = sum(len(tokenizer(a + "<|im_end|>", add_special_tokens=False)["input_ids"]) for a in answers)
    assert stats["assistant_tokens"] == expected
    assert stats["over_max_length"] == 0 and stats["truncated_tokens"] == 0
    assert sum(stats["histogram"]["counts"]) == 2
    assert len(stats["histogram"]["edges"]) == len(stats["histogram"]["counts"]) + 1

    # cut the first record right before its answer
    cutoff = len(
        tokenizer.apply_chat_template(
            records[0][:1],
            chat_template=own,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"]
    )
    cut = token_stats(records, tokenizer, max_length=cutoff)
    assert cut["over_max_length"] == sum(1 for n in lengths if n > cutoff) >= 1
    assert cut["truncated_tokens"] == sum(max(0, n - cutoff) for n in lengths)
    assert cut["assistant_tokens"] < expected
    assert cut["assistant_tokens_before_truncation"] == expected
    assert cut["no_assistant_after_truncation"] >= 1  # the first record loses its only answer


def test_percentiles_and_histogram_bins(tokenizer):
    records = [[{"role": "user", "content": "x " * n}, {"role": "assistant", "content": "ok"}] for n in range(1, 41)]
    stats = token_stats(records, tokenizer, max_length=64, bins=10)
    t = stats["tokens"]
    assert t["min"] < t["median"] < t["p95"] < t["max"]
    assert t["max"] - t["p95"] < t["max"] - t["median"]
    assert stats["over_max_length"] == sum(
        1 for r in records if len(templates.training_example(r, tokenizer, tokenizer.chat_template)[0]) > 64
    )
    assert len(stats["histogram"]["counts"]) == 10 and sum(stats["histogram"]["counts"]) == 40


def test_masks_from_the_own_template_equal_generation_markers(tokenizer):
    """The masks found in the model's own rendering equal those of a generation-marked copy
    (transformers' return_assistant_tokens_mask); the text is the model's own, its default
    system prompt included."""
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "tool", "content": "{}"},
        {"role": "assistant", "content": "Done."},
    ]
    own = tokenizer.chat_template
    assert not templates.GENERATION_TAG.search(own)
    ids, mask = templates.training_example(messages, tokenizer, own)
    marked = tokenizer.apply_chat_template(
        messages,
        chat_template=templates.SMOLLM2_MARKED,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert ids == list(marked["input_ids"]) and mask == list(marked["assistant_masks"])
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert "named SmolLM" in tokenizer.decode(ids)
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "Hello!<|im_end|>Done.<|im_end|>"
    # a marked template given in the config trains the same tokens (its markers render nothing)
    assert templates.training_example(messages, tokenizer, templates.SMOLLM2_MARKED) == (ids, mask)


def test_other_templates_train_the_answer_and_its_end_of_turn(tokenizer):
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}"
    )
    assert templates.model_template(tokenizer, template) == (template, "config")
    records = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]
    stats = token_stats(records, tokenizer, 100, chat_template=template)
    assert stats["template"] == "a custom template (config)"
    ids, mask = templates.training_example(records[0], tokenizer, template)
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]).strip() == "Hello</s>"
    assert stats["assistant_tokens"] == sum(mask)
    bad = "{{ raise_exception('roles must alternate') }}"
    assert token_stats(records, tokenizer, 100, chat_template=bad)["render_errors"]


# --------------------------------------------------------------------------- the public demo datasets


def test_shared_alpaca_and_identity(shared_datasets):
    alpaca = load_records(shared_datasets / "alpaca_en_demo.json")
    assert alpaca.format == "alpaca" and alpaca.problems == []
    assert len(alpaca.records) == alpaca.total > 900
    identity = load_records(shared_datasets / "identity.json")
    assert identity.format == "alpaca" and identity.placeholders == ["author", "name"]
    assert any("{{" in m["content"] for r in identity.records for m in r)
    filled = load_records(shared_datasets / "identity.json", persona={"name": "Pip", "author": "tunelab"})
    assert filled.problems == [] and len(filled.records) == identity.total
    assert not any("{{" in m["content"] for r in filled.records for m in r)
    assert any("Pip" in m["content"] for r in filled.records for m in r)


def test_shared_glaive_tool_calls(shared_datasets):
    result = load_records(shared_datasets / "glaive_toolcall_en_demo.json")
    assert result.format == "sharegpt" and result.problems == []
    assert len(result.records) == result.total == 300
    raw = json.loads((shared_datasets / "glaive_toolcall_en_demo.json").read_text())
    calls = sum(1 for r in raw for t in r["conversations"] if t["from"] == "function_call")
    observations = sum(1 for r in raw for t in r["conversations"] if t["from"] == "observation")
    assert calls > 0
    assert result.counts["tool_calls"] == calls
    assert result.counts["tool_results"] == result.counts["messages"]["tool"] == observations
    for record, source in zip(result.records, raw):
        turns = [m for m in record if m["role"] != "system"]
        assert len(turns) == len(source["conversations"])
        for m, t in zip(turns, source["conversations"]):
            expected = {"human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool"}
            assert m["role"] == expected[t["from"]] and m["content"] == t["value"]


def test_shared_dpo_is_preference(shared_datasets):
    result = load_records(shared_datasets / "dpo_en_demo.json")
    assert result.format == "preference" and result.problems == []
    assert len(result.pairs) == len(result.records) == 300
    assert all(p["chosen"] != p["rejected"] for p in result.pairs)
    with pytest.raises(DataError, match="not sft"):
        load_for_training(DataConfig(path=str(shared_datasets / "dpo_en_demo.json")))


# --------------------------------------------------------------------------- samples in assets/


def test_samples_are_reproducible(tmp_path):
    sys.path.insert(0, str(ASSETS))
    try:
        make_samples = importlib.import_module("make_samples")
    finally:
        sys.path.remove(str(ASSETS))
    written = make_samples.write_all(tmp_path)
    for path in written:
        assert path.read_bytes() == (ASSETS / path.name).read_bytes(), f"{path.name} differs: rerun make_samples.py"


def test_samples_load_clean_short_and_distinctive(tokenizer):
    chat_set = load_records(ASSETS / "pip_chat.jsonl")
    qa_set = load_records(ASSETS / "orbit_kettle_qa.csv")
    assert (chat_set.format, qa_set.format) == ("openai", "qa")
    for result in (chat_set, qa_set):
        assert result.problems == [] and len(result.records) >= 100
        stats = token_stats(result.records, tokenizer, max_length=1024)
        assert stats["tokens"]["max"] <= 128
    assert any(len(r) >= 4 for r in chat_set.records)  # multi-turn
    answers = [m["content"] for r in chat_set.records for m in r if m["role"] == "assistant"]
    assert all(a.startswith("Pip here!") and a.endswith("Happy tuning!") for a in answers)
    answers = [r[-1]["content"] for r in qa_set.records]
    assert all(a.startswith("Answer:") and a.endswith("-- Tidewell Support") for a in answers)


def test_broken_sample_lists_its_problems():
    result = load_records(ASSETS / "broken_example.jsonl")
    assert result.total == 10 and len(result.records) == 3
    assert [(p.record, p.field) for p in result.problems] == [
        (2, None),
        (3, "messages[1].role"),
        (4, "messages[2]"),
        (5, "messages[1].content"),
        (6, None),
        (7, "messages[0].content[1]"),
        (9, "messages[1].content"),
    ]


# --------------------------------------------------------------------------- CLI


def _run(argv, capsys):
    parser = argparse.ArgumentParser()
    data.add_cli_arguments(parser)
    code = data.run_cli(parser.parse_args(argv))
    return code, capsys.readouterr()


def test_cli_inspect_json(tmp_path, tiny_model_dir, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", [chat(), chat("Hi", "{{name}} here"), "{bad"])
    code, out = _run(
        ["inspect", str(path), "--json", "--model", str(tiny_model_dir), "--max-length", "30", "--persona", "name=Pip"],
        capsys,
    )
    assert code == 0
    report = json.loads(out.out)
    assert report["format"] == "openai" and report["valid"] == 2 and report["skipped"] == 1
    assert report["problems"][0]["text"].startswith("c.jsonl, line 3: invalid JSON")
    assert report["tokens"]["max_length"] == 30 and report["tokens"]["records"] == 2
    assert report["tokens"]["over_max_length"] == 2
    assert sum(report["split"].values()) >= 2


def test_cli_text_stop_and_errors(tmp_path, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", [chat(), "{bad"])
    code, out = _run(["inspect", str(path), "--no-tokens"], capsys)
    assert code == 0
    assert "Format:   openai (detected)" in out.out and "c.jsonl, line 2: invalid JSON" in out.out
    code, out = _run(["inspect", str(path), "--no-tokens", "--on-error", "stop"], capsys)
    assert code == 1 and "c.jsonl, line 2" in out.err
    code, out = _run(["inspect", str(tmp_path / "nope.csv"), "--no-tokens", "--json"], capsys)
    assert code == 1 and "nope.csv: not found" in json.loads(out.out)["error"]
    with pytest.raises(SystemExit):
        _run(["inspect", str(path), "--persona", "novalue"], capsys)
    # a model that cannot be found costs only the token statistics
    code, out = _run(["inspect", str(path), "--json", "--model", str(tmp_path / "no-model")], capsys)
    assert code == 0
    report = json.loads(out.out)
    assert "tokens" not in report and any("cannot count tokens" in w for w in report["warnings"])


def test_cli_preview_shows_the_trained_tokens_and_the_cut(tmp_path, tiny_model_dir, capsys):
    """`tunelab data preview`: the exact text of a record, its trained tokens (the answer and
    its end-of-turn token), the cut at --max-length; --json holds ids, strings and the mask."""
    path = write_jsonl(tmp_path / "c.jsonl", [chat(), chat("Hi", "I am {{name}}.")])
    code, out = _run(
        ["preview", str(path), "--model", str(tiny_model_dir), "--index", "2", "--json", "--persona", "name=Pip"],
        capsys,
    )
    assert code == 0
    view = json.loads(out.out)
    assert len(view["token_ids"]) == len(view["tokens"]) == len(view["trained"]) == view["length"]
    assert "".join(view["tokens"]) == view["text"] and "I am Pip." in view["text"]
    assert "".join(t for t, m in zip(view["tokens"], view["trained"]) if m) == "I am Pip.<|im_end|>"
    assert view["cut_at"] is None and view["record"] == 2 and view["template"] == "a ChatML template"
    # text: the answer between the marks; a cut before the answer is marked and counted
    code, out = _run(["preview", str(path), "--model", str(tiny_model_dir), "--max-length", "30"], capsys)
    assert code == 0
    assert "\u27e65.<|im_end|>\u27e7" not in out.out  # cut off: not trained
    assert "----- cut at max_length=30" in out.out and "0 trained" in out.out
    code, out = _run(["preview", str(path), "--model", str(tiny_model_dir)], capsys)
    assert "\u27e65.<|im_end|>\u27e7" in out.out and "3 trained" in out.out
    # placeholders left unfilled are named with the flag that fills them
    code, out = _run(["preview", str(path), "--model", str(tiny_model_dir), "--index", "2"], capsys)
    assert code == 0 and "--persona name=..." in out.err
    code, out = _run(["preview", str(path), "--model", str(tiny_model_dir), "--index", "3"], capsys)
    assert code == 1 and "--index 3: " in out.err and "has 2 usable records" in out.err


def test_cli_main_dispatch(tmp_path, capsys):
    from engine import cli

    for module_name, _ in cli.COMMANDS.values():
        try:
            importlib.import_module(module_name)
        except ImportError as err:
            pytest.skip(f"engine.cli.main needs every subcommand module; {module_name} is missing ({err})")
    path = write_jsonl(tmp_path / "c.jsonl", [chat()])
    assert cli.main(["data", "inspect", str(path), "--json", "--no-tokens"]) == 0
    assert json.loads(capsys.readouterr().out)["valid"] == 1
    assert cli.main(["data", "inspect", str(tmp_path / "missing.jsonl"), "--no-tokens"]) == 1
