"""The README's first command, end to end on the embedded default (slow: minutes on 2 cores)."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_quickstart_answers_three_questions_with_sources():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "trustray.cli", "quickstart", "--port", str(free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1100,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    # A first run (no full index yet, as on a fresh clone) answers from the first slice, builds the full index,
    # swaps it in and answers again; a later run answers once from the full index.
    first_run = "building a first slice" in out
    answers = re.findall(r"^A: \S", out, flags=re.M)
    assert len(answers) == (6 if first_run else 3), out
    assert out.count("source:") >= len(answers), out
    assert "Eiffel" in out and "quickstart finished" in out
    if first_run:
        assert out.index("answered 3 questions over HTTP from the first slice") < out.index("full index ready")
        assert "-first-slice" in out.split("full index ready")[0] and "answered 3 questions over HTTP from the full index" in out
