"""The reference point for the DPO benchmark: a plain TRL DPOTrainer + PEFT LoRA script,
written the way the TRL documentation shows it, with the same model, pairs, LoRA settings,
batch, steps, learning rate, beta, max length and precision as the tunelab run it is
compared with.

It prints one JSON line: non-padding tokens per second and wall time of ``trainer.train()``,
the final reward accuracy and margin (means of the last 5 logged steps) and peak resident
memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--data", required=True, help="JSONL of conversational prompt/chosen/rejected")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    dataset = load_dataset("json", data_files=args.data, split="train")
    config = DPOConfig(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        beta=args.beta,
        max_length=args.max_length,
        bf16=args.precision == "bf16",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        include_num_input_tokens_seen="non_padding",
        use_cpu=True,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "loss" in h]
    last = logs[-5:]
    tokens = trainer.state.num_input_tokens_seen
    print(
        json.dumps(
            {
                "tokens": int(tokens),
                "train_seconds": wall,
                "tokens_per_second": tokens / wall,
                "reward_accuracy": sum(h["rewards/accuracies"] for h in last) / len(last),
                "reward_margin": sum(h["rewards/margins"] for h in last) / len(last),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
