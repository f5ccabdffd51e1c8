"""Push to the Hub: the model card, the staged upload, and every way a push fails.

Run directories are written by hand (config.yaml through RunConfig, metrics.jsonl,
eval.json, train.log, a parity report, small artifact files): the card and the push read
files, no model is loaded. Nothing here reaches the real Hub: failures go to a closed
local port or a local HTTP server, and the one successful push records what HfApi got.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import socket
import threading
from pathlib import Path

import pytest
import yaml

from engine import hub
from engine.config import DataConfig, MethodConfig, ModelConfig, RunConfig, TrainingConfig
from engine.hub import HubError

TOKEN = "hf_TestSecretToken0123456789abcdefXYZ"
PLAIN_SECRET = "plain-secret-value-42"  # not shaped like a Hub token: only the environment reveals it


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def make_run(
    root: Path,
    method: str = "lora",
    model: str = "smollm2-135m-instruct",
    system_prompt=None,
    persona=None,
    log_extra: str = "",
) -> Path:
    """A finished run: config, status, metrics, eval.json, train.log and an adapter/ or model/."""
    run_dir = root / "runs" / f"20260101-000000-{method}-pip_chat-abcd"
    run_dir.mkdir(parents=True)
    data_file = root / "private" / "data" / "pip_chat.jsonl"
    cfg = RunConfig(
        model=ModelConfig(name_or_path=model),
        data=DataConfig(
            path=str(data_file),
            format="auto",
            validation_split=0.1,
            max_length=512,
            system_prompt=system_prompt,
            persona=persona or {},
        ),
        method=MethodConfig(name=method, r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"]),
        training=TrainingConfig(
            learning_rate=3e-4, batch_size=8, gradient_accumulation_steps=2, max_steps=40, precision="fp32"
        ),
    )
    cfg.output.runs_dir = str(run_dir.parent)
    cfg.output.run_id = run_dir.name
    cfg.save(run_dir / "config.yaml")
    _write_json(
        run_dir / "status.json",
        {
            "state": "completed",
            "run_id": run_dir.name,
            "step": 40,
            "max_steps": 40,
            "precision": "fp32",
            "train_loss": 1.7321,
            "tokens_seen": 51234,
            "started_at": 1000.0,
            "ended_at": 1000.0 + 630.0,
            "host": "my-laptop",
            "error": None,
        },
    )
    rows = [
        {"step": 1, "epoch": 0.05, "loss": 2.8765, "tokens_per_second": 400.0},
        {"step": 20, "epoch": 0.5, "loss": 1.6543, "tokens_per_second": 420.0},
        {"step": 40, "epoch": 1.0, "loss": 1.2345, "tokens_per_second": 440.0, "eval_loss": 1.4321},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    _write_json(
        run_dir / "eval.json",
        {
            "split": "validation",
            "examples": 12,
            "loss_on": "assistant tokens",
            "base": {"loss": 2.3456, "perplexity": 10.4399},
            "tuned": {"loss": 1.4321, "perplexity": 4.1878},
            "loss_change": -0.9135,
        },
    )
    _write_json(
        run_dir / "data.json",
        {"format": "openai", "total": 123, "usable": 120, "skipped": 3, "train": 108, "validation": 12},
    )
    (run_dir / "train.log").write_text(
        f"[tunelab] run {run_dir}\n"
        f"[tunelab] data {data_file}: format openai, 120 usable of 123 records (3 skipped); train 108, validation 12\n"
        f"{log_extra}\n[tunelab] completed at step 40/40\n",
        encoding="utf-8",
    )
    if method == "full":
        _write_json(run_dir / "model" / "config.json", {"model_type": "llama", "_name_or_path": str(root)})
        (run_dir / "model" / "model.safetensors").write_bytes(b"\0" * 64)
    else:
        _write_json(
            run_dir / "adapter" / "adapter_config.json",
            {"base_model_name_or_path": str(root / "cache" / "smollm2"), "peft_type": "LORA", "r": 8},
        )
        (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 128)
        (run_dir / "adapter" / "README.md").write_text(
            f"---\nbase_model: {root}/cache/smollm2\n---\n# Model Card for Model ID\n"
        )
        (run_dir / "adapter" / "training_args.bin").write_bytes(b"pickle")
        _write_json(run_dir / "adapter" / "tokenizer_config.json", {"eos_token": "<|im_end|>"})
    return run_dir


def add_exports(run_dir: Path) -> None:
    """export/merged, export/onnx-int4 and a parity report, as engine.export writes them."""
    merged = run_dir / "export" / "merged"
    _write_json(merged / "config.json", {"model_type": "llama"})
    (merged / "model.safetensors").write_bytes(b"\0" * 256)
    _write_json(merged / "tunelab-export.json", {"source": "adapter", "base": str(run_dir.parent)})
    onnx = run_dir / "export" / "onnx-int4"
    _write_json(onnx / "genai_config.json", {"model": {"eos_token_id": [2]}})
    (onnx / "model.onnx").write_bytes(b"\0" * 32)
    (onnx / "chat_template.jinja").write_text("{{ messages }}")
    _write_json(onnx / "tunelab-export.json", {"source": str(merged)})
    _write_json(
        run_dir / "export" / "parity.json",
        {
            "run": str(run_dir),
            "base_model": str(run_dir.parent / "cache"),
            "method": "lora",
            "merge": {"max_abs_logit_diff": 3.1e-06, "tolerance": 1e-3, "passed": True, "greedy_identical": "5/5"},
            "onnx": {
                "int4": {
                    "greedy_identical": "4/5",
                    "token_agreement": 0.9625,
                    "agreement_tokens": 160,
                    "perplexity": {
                        "pytorch": 5.4321,
                        "onnx": 5.6789,
                        "difference": 0.2468,
                        "source": "validation split (12 chats)",
                    },
                    "block_size": 128,
                    "execution_provider": "cpu",
                    "validation_chats": 12,
                    "verdict": {
                        "verdict": "faithful",
                        "summary": "faithful: it answers like the tuned model (token agreement 96.2%, "
                        "validation perplexity +4.5%, 4/5 replies greedy-identical)",
                    },
                }
            },
            "tokenizer": {"int4": {"identical": True, "texts": 10, "mismatches": []}},
            "sizes_bytes": {"adapter": 3_600_000, "merged": 538_000_000, "onnx-int4": 86_000_000},
            "speed": {
                "pytorch_merged": {"decode_tokens_per_s": 8.51, "ttft_s": 0.12},
                "onnx_int4": {"decode_tokens_per_s": 87.3, "ttft_s": 0.021},
            },
        },
    )


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4 : card.index("\n---\n", 4)])


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def online(monkeypatch):
    """Network allowed as far as the environment goes (tests/conftest.py sets offline mode)."""
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


# --------------------------------------------------------------------------- the card


def test_card_reports_data_method_hyperparameters_and_losses(tmp_path):
    run = make_run(tmp_path)
    card = hub.model_card(run, "adapter", "my-org/pip-lora")

    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "peft"
    assert meta["license"] == "apache-2.0"
    assert {"tunelab", "lora"} <= set(meta["tags"]) and "onnx" not in meta["tags"]

    # data: file name, format, counts and split from the trainer's log line
    assert "`pip_chat.jsonl`" in card
    assert "| format | openai |" in card
    assert "120 usable of 123 (3 skipped)" in card
    assert "108 train / 12 validation" in card
    # method and LoRA options
    assert "rank r=8, alpha=16" in card and "dropout 0.1" in card and "q_proj, v_proj" in card
    # hyperparameters
    assert "| learning rate | 0.0003 |" in card
    assert "8 x 2 accumulation" in card
    assert "40/40 (completed)" in card
    assert "10.5 min" in card  # 630 s between started_at and ended_at
    # final train / eval losses and base vs tuned from eval.json
    assert "training loss: 1.234 at step 40 (from 2.877 at step 1)" in card
    assert "validation loss during training: 1.432 at step 40" in card
    assert "| base | 2.346 | 10.44 |" in card
    assert "| tuned | 1.432 | 4.188 |" in card
    # how to load it
    assert 'AutoPeftModelForCausalLM.from_pretrained("my-org/pip-lora")' in card
    # no local path, not even the data directory or the machine's name
    assert str(tmp_path) not in card and "private/data" not in card and "my-laptop" not in card


@pytest.mark.parametrize("secret", [TOKEN, PLAIN_SECRET])
def test_card_never_contains_the_token(tmp_path, monkeypatch, secret):
    monkeypatch.setenv("HF_TOKEN", secret)
    run = make_run(
        tmp_path,
        system_prompt=f"You are Pip. debug token {secret}",
        persona={"name": "Pip", "key": secret},
        log_extra=f"[tunelab] using HF_TOKEN={secret}",
    )
    card = hub.model_card(run, "adapter", "my-org/pip-lora")
    assert secret not in card
    assert "You are Pip. debug token ***" in card  # the rest of the system prompt is still reported


def test_card_of_onnx_export_has_parity_figures_and_onnx_snippet(tmp_path):
    run = make_run(tmp_path)
    add_exports(run)
    card = hub.model_card(run, "onnx-int4", "my-org/pip-onnx")
    meta = front_matter(card)
    assert {"tunelab", "lora", "onnx"} <= set(meta["tags"])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["base_model_relation"] == "finetune"
    assert "4/5 probe chats" in card
    assert (
        "**Verdict: faithful: it answers like the tuned model (token agreement 96.2%, validation perplexity +4.5%"
        in card
    )
    assert "96.2% of 160" in card
    assert "perplexity PyTorch 5.432 -> ONNX 5.679 (on the validation split (12 chats))" in card
    assert "identical ids on 10 texts" in card
    assert "max |logit difference| 3.10e-06" in card
    assert "87.3 tokens/s" in card and "86.0 MB" in card
    assert 'og.Model("pip-onnx")' in card and "hf download my-org/pip-onnx" in card
    assert str(tmp_path) not in card


def test_card_of_merged_model_loads_with_transformers(tmp_path):
    run = make_run(tmp_path)
    add_exports(run)
    card = hub.model_card(run, "merged", "my-org/pip-merged")
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and "onnx" not in meta["tags"]
    assert 'AutoModelForCausalLM.from_pretrained("my-org/pip-merged")' in card
    assert "8.51 tokens/s" in card and "ONNX" not in card.split("## How to use")[0].split("## Export parity")[1]


def test_card_of_a_local_base_names_only_the_directory(tmp_path):
    base = tmp_path / "models" / "my-base-7b"
    base.mkdir(parents=True)
    (base / "README.md").write_text("---\nlicense: mit\n---\n# my base\n")
    run = make_run(tmp_path, method="full", model=str(base))
    card = hub.model_card(run, "model", "my-org/full")
    meta = front_matter(card)
    assert "base_model" not in meta  # not a Hub id: the Hub would reject a path
    assert meta["license"] == "mit" and meta["library_name"] == "transformers"
    assert "`my-base-7b`" in card and "full fine-tune" in card
    assert str(tmp_path) not in card


# --------------------------------------------------------------------------- the staged upload


def test_staged_upload_has_the_card_and_no_local_paths(tmp_path):
    run = make_run(tmp_path)
    dest = tmp_path / "staged"
    files = hub.stage_upload(run, "adapter", "my-org/pip-lora", dest)
    assert sorted(files) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"]
    config = json.loads((dest / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["r"] == 8
    assert (dest / "README.md").read_text() == hub.model_card(run, "adapter", "my-org/pip-lora")
    assert os.path.samefile(dest / "adapter_model.safetensors", run / "adapter" / "adapter_model.safetensors")
    for path in dest.rglob("*"):
        if path.suffix in (".json", ".md"):
            assert str(tmp_path) not in path.read_text(), path.name
    # the run's own files are untouched
    assert "Model Card for Model ID" in (run / "adapter" / "README.md").read_text()


def test_staged_onnx_export_leaves_out_the_export_stamp(tmp_path):
    run = make_run(tmp_path)
    add_exports(run)
    files = hub.stage_upload(run, "onnx-int4", "my-org/pip-onnx", tmp_path / "staged")
    assert "tunelab-export.json" not in files
    assert {"genai_config.json", "model.onnx", "chat_template.jinja", "README.md"} <= set(files)


# --------------------------------------------------------------------------- failures


def test_push_without_token_says_set_hf_token(tmp_path, monkeypatch):
    for name in hub.TOKEN_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    run = make_run(tmp_path)
    with pytest.raises(HubError, match="HF_TOKEN"):
        hub.push_to_hub(run, "adapter", "my-org/pip-lora")


def test_push_in_offline_mode_names_the_network_and_hides_the_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = make_run(tmp_path)
    with pytest.raises(HubError, match="network") as info:
        hub.push_to_hub(run, "adapter", "my-org/pip-lora", token=TOKEN)
    assert "HF_HUB_OFFLINE" in str(info.value) and TOKEN not in str(info.value)


def test_push_to_an_unreachable_hub_is_a_network_error(tmp_path, monkeypatch, online):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run = make_run(tmp_path)
    with pytest.raises(HubError, match="no network connection to the Hub") as info:
        hub.push_to_hub(run, "adapter", "my-org/pip-lora")
    assert TOKEN not in str(info.value) and info.value.__cause__ is None
    assert not list(run.glob(".hub-upload-*"))  # the staging folder is gone


@pytest.mark.parametrize("status, expected", [(401, "refused the token"), (403, "may not write to 'my-org'")])
def test_push_refused_by_the_hub_says_why(tmp_path, monkeypatch, online, status, expected):
    seen = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length") or 0))
            seen.append((self.path, self.headers.get("authorization")))
            body = json.dumps({"error": f"refused: {TOKEN}"}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        run = make_run(tmp_path)
        with pytest.raises(HubError, match=expected) as info:
            hub.push_to_hub(run, "adapter", "my-org/pip-lora", token=TOKEN)
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [("/api/repos/create", f"Bearer {TOKEN}")]  # the argument's token, sent only as a header
    assert TOKEN not in str(info.value)


@pytest.mark.parametrize(
    "artifact, command",
    [
        ("merged", "tunelab export {run} --format merged"),
        ("onnx-int8", "tunelab export {run} --format onnx --precision int8"),
        ("model", "push --artifact adapter"),
    ],
)
def test_push_of_a_missing_artifact_names_the_export_command(tmp_path, artifact, command):
    run = make_run(tmp_path)
    with pytest.raises(HubError) as info:
        hub.push_to_hub(run, artifact, "my-org/pip", token=TOKEN)
    assert command.format(run=run) in str(info.value)


def test_export_command_names_the_run_relative_to_the_working_directory(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubError, match=f"`tunelab export runs/{run.name} --format merged`"):
        hub.push_to_hub(run, "merged", "my-org/pip", token=TOKEN)


def test_push_adapter_of_a_full_fine_tune_points_to_model(tmp_path):
    run = make_run(tmp_path, method="full")
    with pytest.raises(HubError, match="full fine-tune.*--artifact model"):
        hub.push_to_hub(run, "adapter", "my-org/full", token=TOKEN)


@pytest.mark.parametrize(
    "repo_id",
    [
        "pip-lora",
        "my-org/pip/lora",
        "my-org/pip lora",
        "my-org/-pip",
        "my-org/pip..lora",
        "my-org/pip.git",
        "",
        "../etc/passwd",
    ],
)
def test_push_to_an_invalid_repo_id_fails(tmp_path, repo_id):
    run = make_run(tmp_path)
    with pytest.raises(HubError, match="invalid repository id"):
        hub.push_to_hub(run, "adapter", repo_id, token=TOKEN)


def test_unknown_artifact_lists_the_choices(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(HubError, match="onnx-int4"):
        hub.push_to_hub(run, "gguf", "my-org/pip", token=TOKEN)


# --------------------------------------------------------------------------- a push that goes through


def test_push_creates_a_private_repo_and_uploads_the_staged_folder(tmp_path, monkeypatch, online):
    """HfApi is replaced by a recorder (no Hub here): what tunelab asks of it is checked."""
    import huggingface_hub

    calls = {}

    class Recorder:
        def __init__(self, endpoint=None, token=None, **kwargs):
            calls["init"] = {"endpoint": endpoint, "token": token}

        def create_repo(self, repo_id, **kwargs):
            calls["create_repo"] = {"repo_id": repo_id, **kwargs}
            return f"{calls['init']['endpoint']}/{repo_id}"

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            folder = Path(folder_path)
            calls["upload"] = {
                "repo_id": repo_id,
                "files": sorted(p.name for p in folder.iterdir()),
                "card": (folder / "README.md").read_text(),
                **kwargs,
            }

    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", TOKEN)
    run = make_run(tmp_path)
    messages = []
    url = hub.push_to_hub(run, "adapter", "my-org/pip-lora", progress=messages.append)

    assert url == "https://hub.example.org/my-org/pip-lora"
    assert calls["init"] == {"endpoint": "https://hub.example.org", "token": TOKEN}
    assert calls["create_repo"]["private"] is True and calls["create_repo"]["exist_ok"] is True
    assert calls["upload"]["repo_id"] == "my-org/pip-lora"
    assert calls["upload"]["files"] == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer_config.json",
    ]
    assert "120 usable of 123" in calls["upload"]["card"]
    assert not list(run.glob(".hub-upload-*"))
    assert messages and all(TOKEN not in m for m in messages)
    assert TOKEN not in "".join(p.read_text(errors="replace") for p in run.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- CLI


def _cli(argv):
    parser = argparse.ArgumentParser(prog="tunelab push")
    hub.add_push_arguments(parser)
    return hub.run_push_cli(parser.parse_args(argv))


def test_cli_push_without_token_exits_1_with_a_sentence(tmp_path, monkeypatch, capsys):
    for name in hub.TOKEN_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    run = make_run(tmp_path)
    assert _cli([str(run), "--repo", "my-org/pip-lora"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "HF_TOKEN" in err and "Traceback" not in err


def test_cli_card_only_prints_the_card_for_a_run_id(tmp_path, capsys):
    run = make_run(tmp_path)
    assert _cli([run.name[:15], "--runs-dir", str(run.parent), "--repo", "my-org/pip-lora", "--card-only"]) == 0
    out = capsys.readouterr().out
    assert front_matter(out)["library_name"] == "peft" and "108 train / 12 validation" in out


def test_card_includes_the_latest_evaluation(tmp_path):
    import json

    from engine import evaluate

    run = make_run(tmp_path)
    spec = evaluate.EvalSpec(run=str(run), name="pip-check", backends=["base", "tuned"], checks=["starts_with:Pip"])
    eval_dir = evaluate.prepare(spec)
    rows = []
    for i, (base_answer, tuned_answer) in enumerate([("Hi.", "Pip here! Hi."), ("Hello.", "Pip here! Hello.")]):
        for backend, answer in (("base", base_answer), ("tuned", tuned_answer)):
            scores = evaluate.score_answer(
                answer, "Pip here! Hi.", ["rouge_l"], [evaluate.parse_check("starts_with:Pip")], None
            )
            rows.append(
                {
                    "example": i,
                    "backend": backend,
                    "prompt": [{"role": "user", "content": "Hi"}],
                    "reference": "Pip here! Hi.",
                    "answer": answer,
                    "scores": scores,
                    "tokens_per_s": 10.0,
                }
            )
    (eval_dir / evaluate.RESULTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = {"data": str(tmp_path / "private" / "pip_chat.jsonl"), "split": "validation", "examples": 2}
    summary = evaluate.finalize(eval_dir, spec, source, {}, None)
    card = hub.model_card(run, "adapter", "my-org/pip-lora")
    assert "## Evaluation" in card and "2 examples of `pip_chat.jsonl` (validation)" in card
    assert evaluate.summary_table(summary) in card
    assert summary["backends"]["tuned"]["metrics"]["starts_with:Pip"]["value"] == 100.0
    assert "| starts_with:Pip | 0.0 [0.0, 0.0] | 100.0 [100.0, 100.0] |" in card
    assert str(tmp_path) not in card
