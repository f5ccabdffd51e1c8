"""The `tunelab` command: one subcommand per engine module.

Each module named in COMMANDS exposes ``add_cli_arguments(parser)`` and
``run_cli(args) -> int``, and keeps its module-level imports light (torch and
transformers are imported inside functions) so that ``tunelab --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "ui": ("webui.app", "Start the web app."),
    "hw": ("engine.hardware", "Detect the hardware and recommend a training plan."),
    "data": ("engine.data", "Inspect a dataset: format, problems with line numbers, token statistics."),
    "config": ("engine.config", "Print a run config as YAML: every field with its value and help (--set to change)."),
    "train": ("engine.launch", "Train from a YAML config (runs in its own process; see --foreground)."),
    "export": ("engine.export", "Merge a run's adapter and/or export it to ONNX, with a parity report."),
    "chat": ("engine.inference", "Chat with a run's base, tuned or ONNX model in the terminal."),
    "serve": ("engine.serve", "Serve a run's model over an OpenAI-compatible API (/v1/chat/completions)."),
    "eval": ("engine.evaluate", "Evaluate a run's backends over a dataset: metrics, intervals, every answer."),
    "runs": ("engine.runs_cli", "List the runs in a runs directory."),
    "push": ("engine.hub", "Push a run's adapter, merged model or ONNX export to the Hugging Face Hub."),
}


def build_parser() -> argparse.ArgumentParser:
    from engine import __version__

    parser = argparse.ArgumentParser(
        prog="tunelab",
        description="tunelab: fine-tune chat models (LoRA, QLoRA, DoRA, full, DeepSpeed ZeRO) and compare them.",
    )
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sp = sub.add_parser(name, help=help_text, description=help_text)
        module.add_cli_arguments(sp)
        sp.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return int(args._module.run_cli(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
