"""engine.util: Hub ids, tokenizer loading, byte sizes, directory sizes, atomic writes."""

from __future__ import annotations

import json

import pytest

from engine import util


@pytest.mark.parametrize(
    "ref",
    ["HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "my-org/pip_lora.v2", "  a/b  "],
)
def test_hub_ids_the_hub_accepts(ref):
    assert util.check_hub_id(ref) == ref.strip()
    assert util.is_hub_id(ref)


@pytest.mark.parametrize(
    "ref",
    [
        "",
        None,
        "pip-lora",  # no owner
        "my-org/pip/lora",
        "/abs/path",
        "my-org/",
        "my-org/pip lora",
        "my-org/-pip",
        "_org/pip",
        "org/.pip",
        "my-org/pip-",
        "my-org/pip..lora",
        "my--org/pip",
        "my-org/pip.git",
        "../etc",
        "./models",
        "ünï/code",
        "a/" + "x" * 100,
    ],
)
def test_strings_that_are_not_hub_ids(ref):
    with pytest.raises(util.HubIdError):
        util.check_hub_id(ref)
    assert not util.is_hub_id(ref)


def test_an_existing_local_directory_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert not util.is_hub_id("org/model")
    assert util.is_hub_id("org/model", local_wins=False)
    assert util.is_hub_id("org/other")


def test_load_tokenizer_sets_a_missing_pad_token_to_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path)
    assert "pad_token" not in json.loads((tmp_path / "tokenizer_config.json").read_text())

    tok = util.load_tokenizer(tmp_path)
    assert tok.pad_token == "</s>" and tok.pad_token_id == 1
    assert tok("hello world")["input_ids"] == [2, 3]
    batch = tok(["hello", "hello world"], padding=True)
    assert batch["input_ids"][0] == [2, 1] and batch["attention_mask"][0] == [1, 0]


def test_load_tokenizer_keeps_an_existing_pad_token(tiny_model_dir):
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok = util.load_tokenizer(tiny_model_dir, trust_remote_code=False)
    assert own.pad_token is not None and tok.pad_token == own.pad_token
    assert tok.eos_token == own.eos_token


def test_load_tokenizer_passes_trust_remote_code(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    seen = {}

    class Fake:
        pad_token = None
        eos_token = "<eos>"

    def fake_from_pretrained(path, **kwargs):
        seen.update(kwargs, path=path)
        return Fake()

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake_from_pretrained)
    tok = util.load_tokenizer(tmp_path, trust_remote_code=True)
    assert seen == {"path": tmp_path, "trust_remote_code": True} and tok.pad_token == "<eos>"


@pytest.mark.parametrize(
    ("n", "binary", "text"),
    [
        (None, True, "-"),
        (0, True, "0 B"),
        (100, True, "100 B"),
        (1023, True, "1023 B"),
        (1024, True, "1.0 KB"),
        (1536, True, "1.5 KB"),
        (5 * 1024**2, True, "5.0 MB"),
        (1 << 30, True, "1.00 GB"),
        (int(2.5 * 1024**4), True, "2.50 TB"),
        (3 * 1024**5, True, "3072.00 TB"),
        (86_000_000, False, "86.0 MB"),
        (3_600_000, False, "3.6 MB"),
        (538_000_000, False, "538.0 MB"),
        (1_520_000_000, False, "1.52 GB"),
        (999, False, "999 B"),
    ],
)
def test_fmt_bytes(n, binary, text):
    assert util.fmt_bytes(n, binary=binary) == text


def test_dir_size(tmp_path):
    assert util.dir_size(tmp_path / "missing") == 0
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    assert util.dir_size(tmp_path / "a.bin") == 10
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "b.bin").write_bytes(b"x" * 200)
    (tmp_path / "sub" / "deeper" / "c.bin").write_bytes(b"x" * 3000)
    (tmp_path / "sub" / "dangling").symlink_to(tmp_path / "nowhere")
    assert util.dir_size(tmp_path) == 3210
    assert util.dir_size(tmp_path / "sub") == 3200


def test_atomic_dir_puts_a_new_directory_in_place(tmp_path):
    target = tmp_path / "export" / "merged"
    with util.atomic_dir(target) as tmp:
        assert tmp.is_dir() and tmp.parent == target.parent and not target.exists()
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").read_text() == "{}"
    assert sorted(p.name for p in target.parent.iterdir()) == ["merged"]


def test_atomic_dir_replaces_an_existing_directory(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with util.atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").is_file()  # readers see the old one until the end
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_atomic_dir_leaves_the_target_alone_on_failure(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with util.atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    with pytest.raises(KeyboardInterrupt):
        with util.atomic_dir(tmp_path / "fresh"):
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_atomic_write_text(tmp_path):
    path = tmp_path / "data.json"
    util.atomic_write_text(path, '{"a": 1}\n')
    util.atomic_write_text(path, '{"a": 2}\n')
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]
    with pytest.raises(IsADirectoryError):
        util.atomic_write_text(tmp_path, "x")  # cannot replace a directory: the temporary file goes
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.*.tmp"))
