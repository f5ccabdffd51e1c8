"""The reference point for the training benchmark: a plain TRL SFTTrainer + PEFT LoRA script,
written the way the TRL documentation shows it, with the same model, data, LoRA settings,
batch, steps, learning rate and precision as the tunelab run it is compared with.

It prints one JSON line: non-padding tokens per second, wall time of ``trainer.train()``,
final training loss and peak resident memory; the adapter is saved to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--data", required=True, help="OpenAI-messages JSONL (train split)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from engine.templates import SMOLLM2_MARKED

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    # SmolLM2's own template has no {% generation %} markers, which assistant_only_loss needs.
    tokenizer.chat_template = SMOLLM2_MARKED
    model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    dataset = load_dataset("json", data_files=args.data, split="train")
    config = SFTConfig(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        max_length=args.max_length,
        assistant_only_loss=True,
        bf16=args.precision == "bf16",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        include_num_input_tokens_seen="non_padding",
        use_cpu=True,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    start = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - start
    trainer.model.save_pretrained(args.out)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = trainer.state.num_input_tokens_seen
    print(
        json.dumps(
            {
                "tokens": int(tokens),
                "train_seconds": wall,
                "tokens_per_second": tokens / wall,
                "final_loss": losses[-1] if losses else None,
                "mean_loss_last5": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
                "train_loss": result.training_loss,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
