"""RunConfig: YAML round trip, defaults per method, and errors that name the field."""

import pytest

from engine.config import ConfigError, RunConfig


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig.from_dict({"data": {"path": "d.jsonl"}, "method": {"name": "dora", "r": 8}})
    path = tmp_path / "run.yaml"
    cfg.save(path)
    again = RunConfig.load(path)
    assert again == cfg
    assert again.method.name == "dora" and again.method.r == 8


def test_method_default_learning_rates():
    assert RunConfig.from_dict({"method": {"name": "lora"}}).learning_rate == 2e-4
    assert RunConfig.from_dict({"method": {"name": "full"}}).learning_rate == 2e-5
    explicit = RunConfig.from_dict({"method": {"name": "full"}, "training": {"learning_rate": 1e-3}})
    assert explicit.learning_rate == 1e-3


def test_scientific_notation_without_dot_is_a_number(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  learning_rate: 2e-4\n")
    assert RunConfig.load(path).training.learning_rate == pytest.approx(2e-4)


@pytest.mark.parametrize(
    "data, field, words",
    [
        ({"training": {"lerning_rate": 1}}, "training.lerning_rate", "did you mean 'learning_rate'"),
        ({"method": {"name": "lorra"}}, "method.name", "lora, qlora, dora, full"),
        ({"training": {"batch_size": 0}}, "training.batch_size", "> 0"),
        ({"training": {"batch_size": "eight"}}, "training.batch_size", "integer"),
        ({"training": {"precision": "int8"}}, "training.precision", "auto, fp32, bf16, fp16"),
        ({"distributed": {"offload": True}}, "distributed.offload", "zero2 or zero3"),
        ({"distributed": {"deepspeed": "zero1"}}, "distributed.deepspeed", "none, zero2, zero3"),
        ({"method": {"name": "qlora"}, "distributed": {"deepspeed": "zero3"}}, "distributed.deepspeed", "4-bit"),
        ({"data": {"validation_split": 1.5}}, "data.validation_split", "[0, 1)"),
        ({"training": {"assistant_only_loss": "yes"}}, "training.assistant_only_loss", "true or false"),
        ({"model": "x"}, "model", "mapping"),
        ({"modell": {}}, "modell", "did you mean 'model'"),
    ],
)
def test_errors_name_the_field_and_allowed_values(data, field, words):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(data)
    assert info.value.field == field
    assert words in str(info.value)


def test_invalid_yaml_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  max_steps: 5\n   batch_size: [\n")
    with pytest.raises(ConfigError) as info:
        RunConfig.load(path)
    assert "line" in str(info.value) and str(path) in str(info.value)


def test_overrides_parse_values_and_validate():
    cfg = RunConfig().with_overrides(
        ["training.max_steps=10", "method.name=qlora", "method.target_modules=q_proj,v_proj"]
    )
    assert cfg.training.max_steps == 10
    assert cfg.method.name == "qlora"
    assert cfg.method.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="training.max_steps"):
        RunConfig().with_overrides(["training.max_steps=-5"])
    with pytest.raises(ConfigError, match="section.key"):
        RunConfig().with_overrides(["max_steps=5"])


def test_stage_and_its_loss():
    cfg = RunConfig().with_overrides(["training.stage=dpo", "training.loss_type=ipo"])
    assert cfg.training.stage == "dpo" and cfg.loss_type == "ipo"
    assert RunConfig().with_overrides(["training.stage=orpo"]).loss_type == "orpo"
    assert RunConfig().with_overrides(["training.stage=kto"]).loss_type == "kto"
    assert RunConfig().loss_type == "nll"
    # preference stages take a quarter of the method's default step unless one is given
    assert RunConfig().with_overrides(["training.stage=dpo"]).learning_rate == RunConfig().learning_rate / 4
    assert RunConfig().with_overrides(["training.stage=dpo", "training.learning_rate=1e-3"]).learning_rate == 1e-3
    with pytest.raises(ConfigError, match="training.loss_type: 'ipo' is not a loss of stage kto"):
        RunConfig().with_overrides(["training.stage=kto", "training.loss_type=ipo"])
    with pytest.raises(ConfigError, match="training.stage: 'ppo' is not one of sft, dpo, kto, orpo"):
        RunConfig().with_overrides(["training.stage=ppo"])
    assert RunConfig().with_overrides(["model.adapter=''"]).model.adapter is None
