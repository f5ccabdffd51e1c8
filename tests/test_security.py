"""Names from users cannot escape their directory; secrets never leak; demo limits hold."""

import pytest

from engine.config import RunConfig
from engine.security import (
    DemoLimits,
    UnsafeInputError,
    check_remote_code,
    owns,
    redact,
    safe_filename,
    safe_run_id,
    user_dir,
    user_key,
    within,
)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("data.jsonl", "data.jsonl"),
        ("../../etc/passwd", "passwd"),
        ("..\\..\\windows\\system.ini", "system.ini"),
        ("/abs/path/train.csv", "train.csv"),
        ("my data (1).json", "my_data_1_.json"),
        ("ｆｕｌｌ.jsonl", "full.jsonl"),
    ],
)
def test_safe_filename_keeps_only_the_last_component(name, expected):
    assert safe_filename(name) == expected


@pytest.mark.parametrize("name", ["..", "../..", "", "/", "...", "\\"])
def test_safe_filename_refuses_unusable_names(name):
    with pytest.raises(UnsafeInputError):
        safe_filename(name)


@pytest.mark.parametrize("run_id", ["../other", "a/b", "..", ".hidden", "a\\b", "", "x" * 200, "a..b"])
def test_bad_run_ids_are_refused(run_id):
    with pytest.raises(UnsafeInputError):
        safe_run_id(run_id)


def test_good_run_id():
    assert safe_run_id("20261129-lora-smol_1") == "20261129-lora-smol_1"


def test_within_refuses_escapes_and_symlinks(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret").mkdir()
    (root / "link").symlink_to(tmp_path / "secret")
    assert within(root, "a", "b") == (root / "a" / "b").resolve()
    for parts in (("..", "secret"), ("link",), ("/etc",)):
        with pytest.raises(UnsafeInputError):
            within(root, *parts)


def test_users_get_separate_directories(tmp_path):
    a = user_dir(tmp_path, "alice", multi_user=True)
    b = user_dir(tmp_path, "bob", multi_user=True)
    assert a != b and a.is_dir() and b.is_dir()
    assert user_key("Alice") != user_key("alice")
    assert owns(a, a / "runs" / "r1") and not owns(a, b / "runs" / "r1")
    assert not owns(a, a / ".." / user_key("bob"))
    assert user_dir(tmp_path, "alice", multi_user=False) == tmp_path


def test_redact_removes_env_secrets_and_token_shapes():
    env = {"HF_TOKEN": "hf_abcdefghijklmnopqrstuvwxyz012345", "TUNELAB_AUTH": "admin:s3cretpass"}
    text = "token=hf_abcdefghijklmnopqrstuvwxyz012345 other=hf_ZZZZZZZZZZZZZZZZZZZZZZZZZ pw s3cretpass"
    out = redact(text, env)
    assert "abcdefghij" not in out and "ZZZZZZZZZZ" not in out and "s3cretpass" not in out
    assert out.count("***") == 3


def test_demo_mode_refuses_a_run_over_its_limits():
    limits = DemoLimits.from_env({"TUNELAB_DEMO": "1"})
    ok = RunConfig.from_dict({"training": {"max_steps": 30}, "data": {"max_length": 256}})
    limits.check(ok)
    big = RunConfig.from_dict(
        {
            "model": {"name_or_path": "meta-llama/Llama-3.1-8B"},
            "method": {"name": "full"},
            "training": {"max_steps": -1},
        }
    )
    with pytest.raises(UnsafeInputError) as info:
        limits.check(big)
    message = str(info.value)
    for words in ("meta-llama/Llama-3.1-8B", "method 'full'", "max_steps -1", "data.max_length 1024"):
        assert words in message
    DemoLimits.from_env({}).check(big)  # no demo: anything goes


def test_demo_clamp_makes_a_config_fit():
    limits = DemoLimits(enabled=True, max_steps=10)
    cfg = RunConfig()
    limits.clamp(cfg)
    limits.check(cfg)
    assert cfg.training.max_steps == 10


def test_remote_code_needs_the_operator():
    cfg = RunConfig.from_dict({"model": {"trust_remote_code": True}})
    with pytest.raises(UnsafeInputError, match="TUNELAB_ALLOW_REMOTE_CODE"):
        check_remote_code(cfg, {})
    check_remote_code(cfg, {"TUNELAB_ALLOW_REMOTE_CODE": "1"})
    check_remote_code(RunConfig(), {})
