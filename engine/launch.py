"""Start, queue, supervise and stop training runs (``tunelab train``).

:func:`build_command` makes the command line: ``python -m engine.train`` for one device,
``accelerate launch --num_processes N [--num_machines ...] --use_deepspeed
--deepspeed_config_file engine/deepspeed/zero3.json -m engine.train`` for several.

:func:`submit` writes the run directory and starts a small *supervisor* process for it,
detached from the caller (its own session, no shell), so a closed browser tab or a
restarted UI never takes a run down. The supervisor

1. waits for its turn: one training job runs at a time per runs directory; the queue is
   the runs directory itself (runs in state ``queued``, oldest first), examined under a
   lock file, and a run whose processes are gone is marked failed so the queue never
   waits on a ghost;
2. starts the command from command.txt (again its own session), its output in train.log;
3. follows it: on a stop request it sends SIGTERM (the trainer saves a checkpoint and ends
   ``aborted``) and SIGKILL after a grace period; on exit it records the exit code, and
   for a crash the error class and the last lines of the log.

Module-level imports are light (no torch), so ``tunelab --help`` stays fast.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine import runs

QUEUE_LOCK = ".queue.lock"
JOBS_DIR = "eval"  # RUN/eval/<name>/: evaluation jobs, queued with the trainings (engine.evaluate)
EXPORT_JOBS = ("export", "jobs")  # RUN/export/jobs/<name>/: export jobs (engine.export.submit_export)
JOB_PARENTS = ((JOBS_DIR,), EXPORT_JOBS)  # where a run's jobs live, relative to the run
USERS_DIR = "users"  # the web app's per-user runs directories live under <runs>/users/
POLL_S = 0.5
DEFAULT_GRACE_S = 120.0
CREATED_TIMEOUT_S = 60.0
EXIT_ABORTED = 3  # `tunelab train` exit status of a run that was stopped

_started: list[subprocess.Popen] = []  # supervisors started by this process (reaped as they end)


# --------------------------------------------------------------------------- the command


def package_root() -> Path:
    """The directory that holds the ``engine`` package (put on the trainer's PYTHONPATH)."""
    return Path(__file__).resolve().parent.parent


def deepspeed_config_file(config) -> Path:
    """engine/deepspeed/zero2.json, zero3.json, or their *_offload.json variants."""
    name = config.distributed.deepspeed + ("_offload" if config.distributed.offload else "")
    return Path(__file__).resolve().parent / "deepspeed" / f"{name}.json"


def _accelerate(python: str) -> str:
    beside = Path(python).parent / "accelerate"
    return str(beside) if beside.exists() else "accelerate"


def build_command(
    config,
    run_dir: str | Path,
    *,
    config_path: str | Path | None = None,
    machine_rank: int = 0,
    main_process_ip: str | None = None,
    main_process_port: int = 29500,
    python: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    probe: bool = False,
) -> list[str]:
    """The command that trains ``config`` into ``run_dir``.

    ``distributed.num_processes`` counts processes per machine (one per GPU); accelerate
    is given the total. A multi-node run needs ``main_process_ip`` (machine 0's address)
    and each machine's ``machine_rank``.
    """
    from engine.config import ConfigError

    python = python or sys.executable
    run_dir = Path(run_dir)
    dist = config.distributed
    train_args = [
        "-m",
        "engine.train",
        "--config",
        str(config_path or run_dir / runs.CONFIG_FILE),
        "--run-dir",
        str(run_dir),
    ]
    for item in overrides:
        train_args += ["--set", item]
    if probe:
        train_args.append("--probe")
    total = dist.num_processes * dist.num_machines
    if total == 1 and dist.deepspeed == "none":
        return [python, *train_args]
    command = [_accelerate(python), "launch", "--num_processes", str(total), "--num_machines", str(dist.num_machines)]
    if dist.num_machines > 1:
        if not main_process_ip:
            raise ConfigError(
                "distributed.num_machines",
                f"{dist.num_machines} machines need the address of machine 0 (--main-process-ip) and each "
                "machine's rank (--machine-rank)",
            )
        if not 0 <= machine_rank < dist.num_machines:
            raise ConfigError("--machine-rank", f"must be in 0..{dist.num_machines - 1}, got {machine_rank}")
        command += [
            "--machine_rank",
            str(machine_rank),
            "--main_process_ip",
            main_process_ip,
            "--main_process_port",
            str(main_process_port),
        ]
    if dist.deepspeed != "none":
        command += ["--use_deepspeed", "--deepspeed_config_file", str(deepspeed_config_file(config))]
    return command + train_args


def child_env(extra: dict | None = None) -> dict:
    """The environment of the supervisor and trainer: ours, without the app's login
    (the trainer never needs it), with the project on PYTHONPATH."""
    env = dict(os.environ)
    env.pop("TUNELAB_AUTH", None)
    root = str(package_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------- submit / resume / stop


def _absolute_paths(config) -> None:
    """Relative data and model paths are relative to the caller, not to the trainer's cwd."""
    data = Path(str(config.data.path)).expanduser()
    if config.data.path and data.exists():
        config.data.path = str(data.resolve())
    model = Path(str(config.model.name_or_path)).expanduser()
    if model.exists():
        config.model.name_or_path = str(model.resolve())


def submit(config, runs_dir: str | Path | None = None, *, probe: bool = False, **launch_options) -> Path:
    """Create a run directory for ``config`` and start (or queue) it; returns the directory.

    ``probe`` measures instead of training (engine/probe.py): the directory is marked
    ``probe`` in status.json. ``launch_options`` go to :func:`build_command`
    (machine_rank, main_process_ip, ...).
    """
    from engine.config import ConfigError
    from engine.models import availability

    problem = availability(config.model.name_or_path)
    if problem:  # said now, before a run exists, not by the trainer later
        raise ConfigError("model.name_or_path", problem)
    check_trackers(config)
    _reap()
    _absolute_paths(config)
    run_dir = runs.create_run(config, runs_dir)
    if probe:
        runs.update_status(run_dir, probe=True)
    command = build_command(config, run_dir, probe=probe, **launch_options)
    (run_dir / runs.COMMAND_FILE).write_text(shlex.join(command) + "\n", encoding="utf-8")
    _start_supervisor(run_dir)
    return run_dir


def check_trackers(config) -> None:
    """Refuse a run whose experiment trackers are not installed, before it exists."""
    from engine.config import ConfigError
    from engine.tracking import missing

    absent = missing(config.training.report_to)
    if absent:
        raise ConfigError(
            "training.report_to",
            "; ".join(f"{name} is not installed here ({hint})" for name, hint in absent),
        )


def submit_job(job_dir: str | Path, command: list[str], env: dict[str, str] | None = None) -> Path:
    """Queue another heavy job (an evaluation, engine.evaluate; an export, engine.export) in the
    training queue: a directory with status.json under one of JOB_PARENTS, its command run by the same supervisor,
    one job at a time with the trainings of the same runs directory; stopped by :func:`stop`.

    ``env``: variables for the job only (a judge's pasted key): held in the supervisor's memory
    and passed to the job's process, never written to the job directory, its command or its log."""
    _reap()
    job_dir = Path(job_dir).resolve()
    (job_dir / runs.COMMAND_FILE).write_text(shlex.join(command) + "\n", encoding="utf-8")
    if not (job_dir / runs.STATUS_FILE).is_file():
        runs.update_status(job_dir, state="created")
    _start_supervisor(job_dir, env)
    return job_dir


def resume(run_dir: str | Path, overrides: list[str] | None = None) -> Path:
    """Start a stopped, failed or completed run again from its last checkpoint.

    config.yaml gets ``training.resume: true`` (and ``overrides``, e.g. more steps); the
    step count continues and metrics.jsonl grows. The previous attempt is kept in
    status.json's ``history``.
    """
    from engine.config import RunConfig

    run_dir = Path(run_dir).resolve()
    with runs.locked(queue_root(run_dir) / QUEUE_LOCK):
        status = runs.refresh_status(run_dir)
        if status.get("state") not in runs.FINAL_STATES:
            raise runs.RunError(
                f"{run_dir.name} is {status.get('state')}: only a stopped, failed or completed run can be resumed"
            )
        config = RunConfig.load(run_dir / runs.CONFIG_FILE).with_overrides(["training.resume=true", *(overrides or [])])
        config.save(run_dir / runs.CONFIG_FILE)
        attempt = {
            k: status.get(k)
            for k in ("state", "error_class", "error", "exit_code", "step", "started_at", "ended_at")
            if status.get(k) is not None
        }
        cleared = dict.fromkeys(
            (
                "pid",
                "pid_started",
                "trainer_pid",
                "supervisor_pid",
                "supervisor_started",
                "exit_code",
                "error",
                "error_class",
                "log_tail",
                "stop_requested_at",
                "stop_grace_s",
                "started_at",
                "ended_at",
                "queued_at",
            )
        )
        runs.update_status(run_dir, **cleared, state="created", history=[*status.get("history", []), attempt])
    _start_supervisor(run_dir)
    return run_dir


def stop(
    run_dir: str | Path, grace_s: float = DEFAULT_GRACE_S, wait: bool = False, timeout: float | None = None
) -> dict:
    """Stop a run: a queued one is dropped from the queue (``aborted``); a running one gets
    SIGTERM, saves a checkpoint and ends ``aborted``; after ``grace_s`` it is killed.

    With ``wait``, return once the run has ended (or ``timeout`` passed).
    """
    run_dir = Path(run_dir).resolve()
    now = time.time()
    with runs.locked(queue_root(run_dir) / QUEUE_LOCK):
        status = runs.refresh_status(run_dir)
        state = status.get("state")
        if state in ("created", "queued"):
            return runs.update_status(run_dir, state="aborted", ended_at=now, error="stopped before it started")
        if state != "running":
            return status
        status = runs.update_status(run_dir, stop_requested_at=now, stop_grace_s=grace_s)
    supervisor_alive = runs.process_alive(status.get("supervisor_pid"), status.get("supervisor_started"))
    if not supervisor_alive and runs.process_alive(status.get("pid"), status.get("pid_started")):
        # A supervised run gets its SIGTERM from its supervisor (once); one started by hand, from here.
        _signal_trainer(run_dir, status["pid"], signal.SIGTERM)
    if not wait:
        return runs.read_status(run_dir)
    deadline = now + (timeout if timeout is not None else grace_s + 30)
    killed = False
    while time.time() < deadline:
        status = runs.refresh_status(run_dir)
        supervised = runs.process_alive(status.get("supervisor_pid"), status.get("supervisor_started"))
        if status.get("state") in runs.FINAL_STATES and not supervised:  # the supervisor has written its part
            return status
        if not supervised and not killed and time.time() - now > grace_s and status.get("pid"):
            # No supervisor to enforce the grace period (a run started by hand): do it here.
            _kill(status["pid"], signal.SIGKILL)
            killed = True
        time.sleep(POLL_S)
    return runs.read_status(run_dir)


def _signal_trainer(run_dir: Path, pid: int, sig: int) -> None:
    """Send ``sig`` to the training processes: the python trainer itself, or, under
    ``accelerate launch``, its worker processes (the launcher then exits by itself when
    they do, instead of tearing them down on a short timer)."""
    import psutil

    targets = [pid]
    command = (
        (run_dir / runs.COMMAND_FILE).read_text(encoding="utf-8") if (run_dir / runs.COMMAND_FILE).exists() else ""
    )
    if " launch " in command:
        try:
            children = psutil.Process(pid).children()
        except psutil.NoSuchProcess:
            children = []
        if children:
            targets = [c.pid for c in children]
    for target in targets:
        _kill(target, sig)


def _kill(pid: int, sig: int, group: bool = False) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass  # it ended on its own meanwhile


# --------------------------------------------------------------------------- the supervisor


def _start_supervisor(run_dir: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -m engine.launch --supervise RUN_DIR`` detached, and queue the run."""
    log = (run_dir / runs.LOG_FILE).open("ab")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.launch", "--supervise", str(run_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not in the caller's process group: Ctrl-C or its death do not reach it
            close_fds=True,
            cwd=str(run_dir),
            env=child_env(env),
        )
    finally:
        log.close()
    _started.append(proc)
    # The supervisor waits while the state is "created"; from here on the queue sees it.
    runs.update_status(
        run_dir,
        state="queued",
        queued_at=time.time(),
        supervisor_pid=proc.pid,
        supervisor_started=runs.process_identity(proc.pid),
    )
    return proc


def queue_root(run_dir: Path) -> Path:
    """The directory whose runs share one queue: the runs directory, or, for the web app's
    per-user layout (``<runs>/users/<user>/<run>``), the top runs directory, so several
    users' trainings still run one at a time on the machine."""
    parent = run_dir.parent
    for parts in JOB_PARENTS:  # a job (RUN/eval/<name>, RUN/export/jobs/<name>) queues with its run
        owner = run_dir.parents[len(parts)] if len(run_dir.parents) > len(parts) else None
        if owner is not None and parent.relative_to(owner).parts == parts and (owner / runs.STATUS_FILE).is_file():
            return queue_root(owner)
    if parent.parent.name == USERS_DIR:
        return parent.parent.parent
    return parent


def queue_members(root: Path):
    """Every run directory (and job directory of JOB_PARENTS) that shares ``root``'s queue."""
    run_dirs = [p for p in root.iterdir() if (p / runs.STATUS_FILE).is_file()]
    users = root / USERS_DIR
    if users.is_dir():
        for user in users.iterdir():
            if user.is_dir():
                run_dirs += [p for p in user.iterdir() if (p / runs.STATUS_FILE).is_file()]
    for run_dir in run_dirs:
        yield run_dir
        for parts in JOB_PARENTS:
            jobs = run_dir.joinpath(*parts)
            if jobs.is_dir():
                yield from (p for p in jobs.iterdir() if (p / runs.STATUS_FILE).is_file())


def _reap() -> None:
    """Collect supervisors of this process that have ended (no zombies left behind)."""
    for proc in list(_started):
        if proc.poll() is not None:
            _started.remove(proc)


def _my_turn(run_dir: Path, status: dict) -> bool:
    """No run is running in this runs directory, and no older one is queued."""
    mine = (status.get("queued_at") or 0.0, run_dir.name)
    for other in queue_members(queue_root(run_dir)):
        if other == run_dir:
            continue
        theirs = runs.refresh_status(other)
        if theirs.get("state") == "running":
            return False
        if theirs.get("state") == "queued" and ((theirs.get("queued_at") or 0.0), other.name) < mine:
            return False
    return True


def _log(message: str) -> None:
    print(f"[tunelab supervisor {time.strftime('%H:%M:%S')}] {message}", flush=True)


def supervise(run_dir: str | Path) -> dict:
    """Wait for the machine, run the command in command.txt, record how it ended."""
    run_dir = Path(run_dir).resolve()
    lock = queue_root(run_dir) / QUEUE_LOCK

    # 1. Wait for our turn.
    waiting_since = time.time()
    announced = False
    while True:
        with runs.locked(lock):
            status = runs.read_status(run_dir)
            state = status.get("state")
            if state in runs.FINAL_STATES:
                _log(f"run {state} before it started")
                return status
            if state == "created" and time.time() - waiting_since > CREATED_TIMEOUT_S:
                return runs.update_status(
                    run_dir,
                    state="failed",
                    error_class=runs.ERROR_OTHER,
                    error="the run was never queued",
                    ended_at=time.time(),
                )
            if state == "queued" and _my_turn(run_dir, status):
                runs.update_status(run_dir, state="running", started_at=time.time())
                break
        if state == "queued" and not announced:
            _log("another run is using this machine: waiting in the queue")
            announced = True
        time.sleep(POLL_S)

    # 2. Start the trainer, in its own session, its output in train.log.
    command = shlex.split((run_dir / runs.COMMAND_FILE).read_text(encoding="utf-8"))
    _log("starting: " + shlex.join(command))
    with (run_dir / runs.LOG_FILE).open("ab") as log:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            cwd=str(run_dir),
            env=child_env({"TUNELAB_SUPERVISED": "1"}),
        )
    runs.update_status(run_dir, pid=proc.pid, pid_started=runs.process_identity(proc.pid))

    # 3. Follow it; a stop request becomes SIGTERM, then SIGKILL after the grace period.
    # SIGTERM to the supervisor itself (a system shutdown) is passed on the same way.
    signal.signal(signal.SIGTERM, lambda *_: runs.update_status(run_dir, stop_requested_at=time.time()))
    sent_term = killed = False
    while True:
        try:
            rc = proc.wait(timeout=POLL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        status = runs.read_status(run_dir)
        asked = status.get("stop_requested_at")
        if asked and not sent_term:
            _signal_trainer(run_dir, proc.pid, signal.SIGTERM)
            sent_term = True
        if asked and not killed and time.time() - asked > float(status.get("stop_grace_s") or DEFAULT_GRACE_S):
            _log("the trainer did not stop within the grace period: killing it")
            _kill(proc.pid, signal.SIGKILL, group=True)
            killed = True
    _kill(proc.pid, signal.SIGKILL, group=True)  # leftovers of the group (workers of a dead launcher)

    # 4. Record the end.
    final = _record_end(run_dir, rc, killed)
    _log(
        f"run {final['state']} (exit code {rc})"
        + (f": {final.get('error_class')}" if final["state"] == "failed" else "")
    )
    return final


def _record_end(run_dir: Path, rc: int, killed_after_grace: bool) -> dict:
    status = runs.read_status(run_dir)
    written = status.get("state")  # what the trainer wrote, if it got the chance
    fields = {"exit_code": rc, "ended_at": (written in runs.FINAL_STATES and status.get("ended_at")) or time.time()}
    if status.get("stop_requested_at"):
        fields["state"] = "aborted"
        if killed_after_grace:
            fields["error"] = "it did not stop within the grace period and was killed; the last checkpoint may be older"
    elif written == "completed" and rc == 0:
        pass
    elif written == "aborted" and rc == 0:
        pass  # someone sent SIGTERM straight to the trainer
    elif written == "failed":
        fields["log_tail"] = runs.tail_log(run_dir, 30)
    else:
        tail = runs.tail_log(run_dir, 30)
        error_class, message = classify_exit(rc, tail)
        fields.update(state="failed", error_class=error_class, error=message, log_tail=tail)
    return runs.update_status(run_dir, **fields)


def classify_exit(rc: int, log_tail: str) -> tuple[str, str]:
    """Error class of a trainer that ended without recording why (killed, hard crash)."""
    text = log_tail.lower()
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else f"signal {-rc}"
        if -rc == signal.SIGKILL:
            return runs.ERROR_KILLED, (
                "killed by SIGKILL: by a person, or by the system's out-of-memory killer when RAM ran out"
            )
        return runs.ERROR_KILLED, f"killed by {name}"
    if "out of memory" in text or "outofmemoryerror" in text:
        return runs.ERROR_OOM, "ran out of memory: lower training.batch_size or data.max_length, or use qlora"
    if "signal 9" in text or "sigkill" in text or "exitcode  : -9" in text:
        return runs.ERROR_KILLED, "a training process was killed (SIGKILL), often by the out-of-memory killer"
    if "config error" in text or "configerror" in text:
        return runs.ERROR_CONFIG, _last_line(log_tail)
    if rc == 0:
        return runs.ERROR_OTHER, "the trainer exited without recording a result"
    return runs.ERROR_OTHER, f"exited with code {rc}: {_last_line(log_tail)}"


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("[tunelab supervisor")]
    return lines[-1].strip() if lines else ""


# --------------------------------------------------------------------------- following


def follow(run_dir: str | Path, out=None, poll_s: float = POLL_S, stop_when=None) -> dict:
    """Print train.log as it grows until the run has ended; returns the final status."""
    run_dir = Path(run_dir)
    out = out or sys.stdout
    path = run_dir / runs.LOG_FILE
    offset = 0
    while True:
        status = runs.refresh_status(run_dir)
        ended = status.get("state") in runs.FINAL_STATES and not runs.process_alive(
            status.get("supervisor_pid"), status.get("supervisor_started")
        )
        if path.exists():
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            if chunk:
                out.write(chunk.decode("utf-8", "replace"))
                out.flush()
        if ended or (stop_when and stop_when(status)):
            return status
        _reap()
        time.sleep(poll_s)


# --------------------------------------------------------------------------- CLI: tunelab train


def add_cli_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="Run config (YAML); see assets/configs/.")
    from engine.config import add_set_argument

    add_set_argument(parser)
    parser.add_argument("--runs-dir", help="Where runs live (default: output.runs_dir of the config, 'runs').")
    parser.add_argument(
        "--foreground",
        action="store_true",
        help="Ctrl-C stops the run (it saves a checkpoint). Without it, Ctrl-C only stops following the log.",
    )
    parser.add_argument("--detach", action="store_true", help="Submit, print the run directory and return at once.")
    parser.add_argument(
        "--print-command",
        action="store_true",
        help="Print the launch command (for a cluster job script) instead of starting anything.",
    )
    parser.add_argument("--machine-rank", type=int, default=0, help="Multi-node: this machine's rank (0 = main).")
    parser.add_argument("--main-process-ip", help="Multi-node: address of machine 0.")
    parser.add_argument("--main-process-port", type=int, default=29500, help="Multi-node: port on machine 0.")
    parser.add_argument("--json", action="store_true", help="Print the final status as JSON.")
    parser.add_argument(
        "--probe",
        action="store_true",
        help="Measure first: a few optimizer steps of this config on the longest examples, then the measured "
        "peak memory, seconds per step and the whole run's projected time beside the formula's estimate.",
    )


def run_cli(args) -> int:
    import json

    from engine.config import ConfigError, RunConfig

    launch_options = {
        "machine_rank": args.machine_rank,
        "main_process_ip": args.main_process_ip,
        "main_process_port": args.main_process_port,
    }
    try:
        config = RunConfig.load(args.config).with_overrides(args.overrides)
        if args.runs_dir:
            config.output.runs_dir = args.runs_dir
        if args.print_command:
            run_dir = Path(config.output.runs_dir) / (config.output.run_id or "my-run")
            command = build_command(
                config, run_dir, config_path=Path(args.config).resolve(), overrides=args.overrides, **launch_options
            )
            print(shlex.join(command))
            return 0
        from engine.recipe import dataset_warning

        warning = dataset_warning(args.config, config)  # a recipe whose data changed since
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        run_dir = submit(config, config.output.runs_dir, probe=args.probe, **launch_options)
    except (ConfigError, runs.RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    status = runs.read_status(run_dir)
    print(f"run {run_dir.name}: {status.get('state')} (directory {run_dir})", flush=True)
    if args.detach:
        return 0
    stopping = False
    while True:
        try:
            status = follow(run_dir)
            break
        except KeyboardInterrupt:
            if args.foreground and not stopping:
                print("\nstopping the run (it saves a checkpoint first; Ctrl-C again to stop waiting)...", flush=True)
                stop(run_dir)
                stopping = True
                continue
            print(
                f"\nstopped following; the run goes on. Follow it: tunelab runs log {run_dir.name} -- "
                f"stop it: tunelab runs stop {run_dir.name} --runs-dir {run_dir.parent}",
                flush=True,
            )
            return 0
    from engine.probe import read as read_probe
    from engine.probe import table as probe_table

    measured = read_probe(run_dir) if args.probe else None
    if args.json:
        print(json.dumps({**status, "probe": measured} if measured else status, indent=2))
    else:
        if measured:
            print(probe_table(measured))
        line = f"run {run_dir.name}: {status.get('state')}"
        if status.get("state") == "failed":
            line += f" ({status.get('error_class')}): {status.get('error')}"
        print(line)
    return {"completed": 0, "aborted": EXIT_ABORTED}.get(status.get("state"), 1)


def _main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m engine.launch")
    parser.add_argument("--supervise", metavar="RUN_DIR", help="(internal) supervise one run directory")
    args, rest = parser.parse_known_args(argv)
    if args.supervise:
        status = supervise(args.supervise)
        return 0 if status.get("state") == "completed" else 1
    # Otherwise behave as `tunelab train`.
    train_parser = argparse.ArgumentParser(prog="python -m engine.launch")
    add_cli_arguments(train_parser)
    return run_cli(train_parser.parse_args(rest))


if __name__ == "__main__":
    sys.exit(_main())
