"""Run directories for the export and inference tests, built without the trainer.

* :func:`chat_base` - the session's tiny random Llama, fully trained for a few seconds on
  three short chats, so it answers them and stops at ``<|im_end|>`` (a random tiny model
  only repeats one token).
* :func:`make_adapter_run` - a run whose ``adapter/`` is a PEFT LoRA (or DoRA) on that base
  with randomly perturbed weights (a fresh adapter is a no-op: B starts at zero).
* :func:`make_full_run` - a run whose ``model/`` holds a full fine-tune.
* :func:`serving` - an OpenAI-compatible API (engine.serve) on a free loopback port.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from pathlib import Path

CHATS = [
    ("Hi!", "Hello! How can I help you today?"),
    ("What is 2+2?", "2+2 is 4."),
    ("Name a colour.", "Blue is a colour."),
]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def chat_base(tiny_model_dir: Path, root: Path, steps: int = 40) -> Path:
    """Train the tiny model on CHATS (all weights, plain torch loop); cached under ``root``."""
    target = Path(root) / "tiny-chat-base"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    examples = []
    for question, answer in CHATS:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        examples.append((torch.tensor([p_ids + a_ids]), torch.tensor([[-100] * len(p_ids) + a_ids])))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        for ids, labels in examples:
            model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.copy2(Path(tiny_model_dir) / "generation_config.json", tmp / "generation_config.json")
    tmp.rename(target)
    return target


def _write_config(run_dir: Path, base: Path, method: str) -> None:
    from engine.config import MethodConfig, ModelConfig, RunConfig

    cfg = RunConfig(
        model=ModelConfig(name_or_path=str(base)),
        method=MethodConfig(name=method, r=8, alpha=16, target_modules=list(LORA_TARGETS)),
    )
    cfg.save(run_dir / "config.yaml")


def make_adapter_run(
    runs_dir: Path,
    base: Path,
    name: str = "lora-run",
    method: str = "lora",
    scale: float = 0.05,
    seed: int = 0,
    save_tokenizer: bool = False,
) -> Path:
    """A run directory with a perturbed PEFT adapter in ``adapter/`` and its config.yaml.

    ``save_tokenizer`` also saves the tokenizer in ``adapter/`` with the ChatML training
    template (``{% generation %}`` markers), as a trainer using assistant-only loss does.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run_dir = Path(runs_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=list(LORA_TARGETS),
        lora_dropout=0.0,
        use_dora=(method == "dora"),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_B" in pname:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(run_dir / "adapter")
    if save_tokenizer:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(base).save_pretrained(run_dir / "adapter")
    _write_config(run_dir, base, method)
    return run_dir


def make_full_run(runs_dir: Path, model_dir: Path, base: Path, name: str = "full-run") -> Path:
    """A run directory whose ``model/`` is a full fine-tune (a copy of ``model_dir``)."""
    run_dir = Path(runs_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(model_dir, run_dir / "model", dirs_exist_ok=True)
    _write_config(run_dir, base, "full")
    return run_dir


def shared_adapter_run(root: Path, base: Path) -> Path:
    """One LoRA run per test session (its exports are reused by every test file)."""
    run_dir = Path(root) / "shared-runs" / "lora-run"
    if not (run_dir / "config.yaml").is_file():
        make_adapter_run(run_dir.parent, base, name=run_dir.name, scale=0.05, save_tokenizer=True)
    return run_dir


def pip_trained_run(root: Path, tiny_model_dir: Path, hidden: int = 128, steps: int = 40) -> Path:
    """A full fine-tune of a tiny Llama (``hidden`` wide) on assets/datasets/pip_chat.jsonl
    (plain torch loop, batch 8, seed 0), as a run directory whose config.yaml points at that
    file with a 10% validation split: in-distribution data for GPTQ's calibration and for the
    parity report's perplexity. Cached under ``root``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.config import RunConfig
    from engine.data import load_for_training
    from engine.models import TinySpec, build_tiny_model

    run_dir = Path(root) / f"pip-runs-{hidden}-{steps}" / "pip-full"
    if (run_dir / "config.yaml").is_file():
        return run_dir
    data = Path(__file__).resolve().parent.parent / "assets" / "datasets" / "pip_chat.jsonl"
    spec = TinySpec(hidden_size=hidden, intermediate_size=3 * hidden)
    base = build_tiny_model(Path(root) / f"tiny-{hidden}", spec, tokenizer_dir=tiny_model_dir)
    cfg = RunConfig()
    cfg.data.path = str(data)
    cfg.data.validation_split = 0.1
    _, train, _ = load_for_training(cfg.data)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    examples = [torch.tensor([tok.apply_chat_template(r, tokenize=True, return_dict=False)[:96]]) for r in train]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        for i in range(8):
            ids = examples[(step * 8 + i) % len(examples)]
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model_dir = Path(root) / f"pip-model-{hidden}-{steps}"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    shutil.copy2(Path(base) / "generation_config.json", model_dir / "generation_config.json")
    run_dir = make_full_run(run_dir.parent, model_dir, base, name=run_dir.name)
    run_cfg = RunConfig.load(run_dir / "config.yaml")
    run_cfg.data.path = str(data)
    run_cfg.data.validation_split = 0.1
    run_cfg.save(run_dir / "config.yaml")
    return run_dir


@contextlib.contextmanager
def serving(api):
    """``api`` served by uvicorn on a free loopback port; yields the /v1 base URL."""
    import uvicorn

    from engine import serve

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(serve.build_server_app(api), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int = 32) -> str:
    """The model's greedy reply to one user question, through its chat template."""
    import torch

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0][prompt["input_ids"].shape[1] :], skip_special_tokens=True)


def stop_process(proc) -> None:
    """End a server started by a test: SIGTERM, then SIGKILL after 20 s."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
