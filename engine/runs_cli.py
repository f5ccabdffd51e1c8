"""`tunelab runs`: list the runs of a runs directory, show one, tail its log, stop or resume it.

Apart from engine.runs (which reads run directories and starts nothing) because stopping and
resuming go through engine.launch, which itself reads runs: keeping the CLI here keeps the two
modules free of an import cycle.
"""

from __future__ import annotations

import json
import time

from engine import launch
from engine.runs import EVAL_FILE, RunError, find_run, list_runs, read_json, read_status, refresh_status, tail_log
from engine.tracking import run_locations

# --------------------------------------------------------------------------- CLI: tunelab runs


def add_cli_arguments(parser) -> None:
    parser.add_argument(
        "action",
        nargs="?",
        default="list",
        choices=("list", "show", "log", "stop", "resume", "recipe"),
        help="list (default): all runs; show RUN: its status and trackers; log RUN: the end of its log; "
        "stop RUN: stop it (it saves a checkpoint); resume RUN: continue a stopped or failed run; "
        "recipe RUN: zip its config, command and environment (no weights) to train it again.",
    )
    parser.add_argument("run", nargs="?", help="A run directory or a run id in --runs-dir.")
    parser.add_argument("--runs-dir", default="runs", help="Directory that holds the runs (default: runs).")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    parser.add_argument("--probes", action="store_true", help="Also list probe runs (tunelab train --probe).")
    parser.add_argument("-n", "--lines", type=int, default=40, help="Lines of log for 'log' (default 40).")
    parser.add_argument("-o", "--output", help="The zip 'recipe' writes (default: RUN-ID-recipe.zip here).")


def fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def run_cli(args) -> int:
    import sys

    action = args.action
    if action != "list" and not args.run:
        print(f"error: 'tunelab runs {action}' needs a RUN (a run directory or id)", file=sys.stderr)
        return 2
    try:
        if action == "list":
            rows = list_runs(args.runs_dir, probes=args.probes)
            if args.json:
                print(json.dumps(rows, indent=2))
                return 0
            if not rows:
                print(f"no runs in {args.runs_dir}")
                return 0
            header = f"{'RUN':44} {'STATE':10} {'STEP':>9} {'METHOD':6} {'CREATED':16} ERROR"
            print(header)
            for r in rows:
                step = f"{r.get('step') or 0}/{r.get('max_steps') or '?'}" if r.get("step") is not None else "-"
                print(
                    f"{r['run_id'][:44]:44} {r['state'] or '?':10} {step:>9} {r.get('method') or '?':6} "
                    f"{fmt_time(r.get('created_at')):16} {r.get('error_class') or ''}"
                )
            return 0
        run_dir = find_run(args.run, args.runs_dir)
        if action == "show":
            status = refresh_status(run_dir)
            status["path"] = str(run_dir)
            evaluation = read_json(run_dir / EVAL_FILE)
            if evaluation:
                status["eval"] = evaluation
            trackers = run_locations(run_dir)
            if trackers:
                status["tracking"] = [vars(t) for t in trackers]
            if args.json:
                print(json.dumps(status, indent=2))
            else:
                for key, value in status.items():
                    if key in ("log_tail", "tracking"):
                        continue
                    if key.endswith("_at") or key.endswith("_started"):
                        value = fmt_time(value)
                    print(f"{key:18} {value}")
                for t in trackers:
                    print(f"{t.tracker:18} {t.where}\n{'':18} open: {t.command}")
                if status.get("log_tail"):
                    print("\nlast lines of the log:\n" + status["log_tail"])
            return 0
        if action == "recipe":
            from engine.recipe import write_recipe

            dest = write_recipe(run_dir, args.output or f"{run_dir.name}-recipe.zip")
            print(f"{dest}: config.yaml, command.txt, environment.json of {run_dir.name} (no weights)")
            return 0
        if action == "log":
            print(tail_log(run_dir, args.lines))
            return 0
        if action == "stop":
            status = launch.stop(run_dir, wait=True)
            print(f"{run_dir.name}: {status.get('state')}")
            return 0
        if action == "resume":
            launch.resume(run_dir)
            print(
                f"{run_dir.name}: resumed ({read_status(run_dir).get('state')}); "
                f"follow it with: tunelab runs log {run_dir.name}"
            )
            return 0
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 2
