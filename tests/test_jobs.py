"""`trustray submit` and `trustray jobs` against a Ray cluster started with `ray start --head` on 127.0.0.1, run
as a user runs them (the command line in a subprocess); bad input is refused before anything is uploaded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_INDEX = ROOT / "configs" / "build_index" / "tiny.yaml"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def dashboard():
    """The dashboard URL of a one-node cluster started by `ray start --head --block`, killed with its processes
    at the end (`ray stop` would also stop the tests' own cluster)."""
    temp = tempfile.mkdtemp(prefix="trj", dir="/tmp")  # short: Ray's socket paths are limited to 107 bytes
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    with open(Path(temp) / "ray-start.log", "w") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={_free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={port}", "--num-cpus=2",
             # Ports of its own: the tests' in-process cluster holds the default agent ports.
             f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
             f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
             f"--ray-client-server-port={_free_port()}",
             "--include-dashboard=true", f"--temp-dir={temp}", "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/api/jobs/", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"ray start did not bring the dashboard up: {(Path(temp) / 'ray-start.log').read_text()}")
        time.sleep(1)
    yield url
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    shutil.rmtree(temp, ignore_errors=True)


def _trustray(*args: str, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "trustray.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_submit_runs_the_pipeline_on_the_cluster_and_exits_with_its_status(dashboard, tiny_embedder_dir, tmp_path):
    # Run from another folder with a relative output: on a local cluster it is made absolute against that folder.
    done = _trustray("submit", "build_index", "--config", str(TINY_INDEX), f"embedder.model={tiny_embedder_dir}",
                     "limit=3", "output_dir=index", "--address", dashboard, "--submission-id", "tiny-index-1",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "job tiny-index-1 SUCCEEDED" in done.stdout
    assert "indexed" in done.stdout  # the job's own log, followed to the end
    metadata = json.loads((tmp_path / "index" / "metadata.json").read_text())
    assert metadata["config"]["limit"] == 3 and metadata["config"]["output_dir"] == str(tmp_path / "index")
    listed = _trustray("jobs", "list", "--address", dashboard)
    assert listed.returncode == 0
    (row,) = [line for line in listed.stdout.splitlines() if line.startswith("tiny-index-1")]
    assert "SUCCEEDED" in row and "run build_index --config configs/build_index/tiny.yaml" in row


def test_a_failing_job_exits_1_and_a_stopped_one_2(dashboard, tmp_path):
    failed = _trustray("submit", "build_index", "--config", str(TINY_INDEX), "embedder.model=/no/such/model",
                       f"output_dir={tmp_path / 'never'}", "--address", dashboard)
    assert failed.returncode == 1 and "FAILED" in failed.stdout
    assert not (tmp_path / "never" / "metadata.json").exists()

    started = _trustray("submit", "build_index", "--config", str(TINY_INDEX), f"output_dir={tmp_path / 'stopped'}",
                        "--address", dashboard, "--no-follow", "--submission-id", "to-stop-1")
    assert started.returncode == 0 and "submitted to-stop-1" in started.stdout
    stopped = _trustray("jobs", "stop", "to-stop-1", "--wait", "--address", dashboard)
    assert stopped.returncode == 0 and "job to-stop-1 STOPPED" in stopped.stdout
    assert _trustray("jobs", "logs", "to-stop-1", "--address", dashboard).returncode == 0
    followed = _trustray("jobs", "logs", "to-stop-1", "--follow", "--address", dashboard)
    assert followed.returncode == 2 and "STOPPED" in followed.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["nope"], "unknown pipeline 'nope'"),
    (["eval:nope"], "unknown pipeline 'eval:nope'"),
    (["build_index", "--config", "/etc/hostname"], "outside the working directory"),
    (["build_index", "--config", "configs/build_index/none.yaml"], "config file not found"),
    (["build_index", "--config", str(TINY_INDEX), "limit=many"], "invalid config for build_index"),
    (["build_index", "--config", str(TINY_INDEX), "--address", "http://10.0.0.1:8265"], "output_dir 'outputs/index/tiny' is relative"),
    (["build_index", "--address", "127.0.0.1:6379"], "--address must be the dashboard's URL"),
])
def test_bad_submissions_are_refused_before_upload(args, message, monkeypatch):
    from trustray.jobs import submit_main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit, match=message):
        submit_main(args)


def test_an_evaluations_own_flags_are_sent_as_the_overrides_they_stand_for(monkeypatch, tmp_path):
    from trustray import jobs

    sent = {}

    class Cluster:
        def submit_job(self, **request):
            sent.update(request)
            return "raysubmit_flags"

    monkeypatch.setattr(jobs, "client", lambda address: Cluster())
    assert jobs.submit_main(["eval:rag", "--config", "configs/eval_rag/cpu.yaml", "--compressor", "truncate",
                             f"output_dir={tmp_path}", "--no-follow", "--address", "http://127.0.0.1:8265"]) == 0
    command = sent["entrypoint"].split()
    assert command[3:5] == ["eval", "rag"] and "compressors=[{name:" in sent["entrypoint"]
    assert "--compressor" not in command
