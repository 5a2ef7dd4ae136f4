"""Jobs on a Ray cluster through its Job Submission API: `trustray submit` and `trustray jobs list|logs|stop`.

`submit` validates the config here first (a typo fails before anything is uploaded), then sends the job with a
runtime environment holding the working directory (by default this source tree: the `trustray` package and its
`configs/`, so the cluster runs this checkout's code on the libraries its image has installed) and the offline
environment variables. The job runs `python -m trustray.cli run|eval ...` exactly as it would run here. The
config file must lie inside the working directory (it is read there on the cluster). An output folder given as a
relative path would land in the job's temporary copy of the working directory and be lost, so it is made
absolute against the current directory when the cluster is on this machine, and refused otherwise: give a path on
storage every node shares. `submit` then follows the job's logs and exits with its status (0 succeeded, 1 failed,
2 stopped); Ctrl-C stops following, not the job.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from trustray.runtime import OFFLINE_DEFAULTS

logger = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_HELP = f"the cluster's dashboard URL (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS, else {DEFAULT_ADDRESS})"
# Never uploaded: environments, outputs, caches and VCS data (Ray's package limit is a few hundred MiB).
EXCLUDES = [".git", ".venv", ".venv-*", "outputs", "**/__pycache__", "*.gguf", "*.safetensors", ".ruff_cache",
            ".pytest_cache", ".hypothesis"]
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 2}
AGENT_WAIT_S = 60
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def resolve_address(address: str | None) -> str:
    """The dashboard URL to submit to: the flag, else `$RAY_API_SERVER_ADDRESS` / `$RAY_ADDRESS` when it is an
    http(s) URL, else the local default."""
    for candidate in (address, os.environ.get("RAY_API_SERVER_ADDRESS"), os.environ.get("RAY_ADDRESS")):
        if candidate:
            if not candidate.startswith(("http://", "https://")):
                if candidate is address:
                    raise SystemExit(f"--address must be the dashboard's URL (e.g. {DEFAULT_ADDRESS}), got "
                                     f"{candidate!r}")
                continue
            return candidate.rstrip("/")
    return DEFAULT_ADDRESS


def client(address: str | None) -> Any:
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError) as error:
        raise SystemExit(f"cannot reach the Ray dashboard at {url}: {error}") from None


def default_working_dir() -> Path:
    """This source tree when trustray runs from one (it has configs/), else the current directory."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "configs").is_dir() and (root / "pyproject.toml").is_file() else Path.cwd()


def entrypoint_args(name: str) -> list[str]:
    """`run NAME` for a job, `eval WHAT` for an evaluation named `eval:WHAT`; an error naming what exists
    otherwise."""
    from trustray.pipelines import EVALUATIONS, JOBS

    if name in JOBS:
        return ["run", name]
    what = name.removeprefix("eval:")
    if name.startswith("eval:") and what in EVALUATIONS:
        return ["eval", what]
    raise SystemExit(f"unknown pipeline {name!r}; jobs: {', '.join(JOBS)}; evaluations: "
                     f"{', '.join('eval:' + what for what in EVALUATIONS)}")


def check_config(name: str, entry: list[str], config: str | None, overrides: list[str], working_dir: Path,
                 local_cluster: bool) -> tuple[str | None, list[str]]:
    """Validate the config here; return its path relative to the working directory and the overrides, with a
    relative output folder made absolute (local cluster) or refused (remote cluster)."""
    from pydantic import ValidationError

    from trustray.config import load_config, resolve_config_path
    from trustray.pipelines import EVALUATIONS, load_pipeline

    kind, what = entry
    spec = load_pipeline(EVALUATIONS[what] if kind == "eval" else what)
    path = relative = None
    if config is not None:
        try:
            path = resolve_config_path(config).absolute()  # not resolve(): configs/ is a link into the package
        except FileNotFoundError as error:
            raise SystemExit(str(error)) from None
        try:
            relative = str(path.relative_to(working_dir))
        except ValueError:
            raise SystemExit(f"config {path} is outside the working directory {working_dir}, which is all the "
                             "cluster receives: move it there or pass --working-dir") from None
    try:
        loaded = load_config(spec["config"], path, overrides)
    except (ValidationError, ValueError) as error:
        raise SystemExit(f"invalid config for {name}: {error}") from None
    output_dir = getattr(loaded, "output_dir", None)
    if output_dir is not None and not Path(output_dir).is_absolute():
        if not local_cluster:
            raise SystemExit(f"output_dir {output_dir!r} is relative: on the cluster it would be written inside the "
                             "job's temporary working directory and lost. Give a folder every node shares, e.g. "
                             "output_dir=/mnt/shared/outputs/...")
        overrides = [*overrides, f"output_dir={Path(output_dir).resolve()}"]
    return relative, overrides


def evaluation_flags_as_overrides(argv: list[str]) -> list[str]:
    """An evaluation's own flags (`eval:rag --compressor NAME`) turned into the overrides they stand for, as
    `trustray eval` does, so they are checked here and sent as overrides."""
    from trustray.pipelines import EVALUATIONS, load_pipeline

    for item in argv:
        what = item.removeprefix("eval:")
        if item.startswith("eval:") and what in EVALUATIONS:
            spec = load_pipeline(EVALUATIONS[what])
            return spec["flags"](argv) if "flags" in spec else argv
    return argv


def submit_main(argv: list[str]) -> int:
    """`trustray submit PIPELINE [options] [KEY=VALUE ...]`, options and overrides in any order."""
    import argparse

    parser = argparse.ArgumentParser(prog="trustray submit", description="Run a pipeline or an evaluation as a job "
                                     "on a Ray cluster, follow its logs and exit with its status.")
    parser.add_argument("pipeline", help="a job (e.g. build_index) or an evaluation (eval:rag, eval:edit, "
                        "eval:influence)")
    parser.add_argument("--config", help="YAML config inside the working directory, e.g. configs/build_index/cpu.yaml")
    parser.add_argument("--address", help=ADDRESS_HELP)
    parser.add_argument("--working-dir", help="folder uploaded with the job (default: this source tree)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable "
                        "of the job (repeatable)")
    parser.add_argument("--submission-id", help="the job's id (default: one Ray makes up)")
    parser.add_argument("--no-follow", action="store_true", help="return once submitted instead of following the logs")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. limit=100 (an "
                        "evaluation's own flags too: eval:rag --compressor truncate)")
    args = parser.parse_intermixed_args(evaluation_flags_as_overrides(argv))
    return submit(args.pipeline, args.config, args.overrides, args.address, args.working_dir, args.env,
                  not args.no_follow, args.submission_id)


def submit(name: str, config: str | None, overrides: list[str], address: str | None, working_dir: str | None,
           env: list[str], follow: bool, submission_id: str | None) -> int:
    """Submit pipeline or evaluation `name` and (with `follow`) stream its logs; the exit code of its status."""
    folder = Path(working_dir).resolve() if working_dir else default_working_dir()
    if not folder.is_dir():
        raise SystemExit(f"working directory {folder} does not exist")
    url = resolve_address(address)
    local_cluster = urlparse(url).hostname in LOOPBACK
    entry = entrypoint_args(name)
    relative, overrides = check_config(name, entry, config, overrides, folder, local_cluster)
    command = [sys.executable if local_cluster else "python", "-m", "trustray.cli", *entry]
    if relative is not None:
        command += ["--config", relative]
    command += overrides
    # The job's driver connects with a runtime env of its own (trustray.actors.cluster): merge, do not refuse.
    env_vars = {**OFFLINE_DEFAULTS, "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
    for item in env:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise SystemExit(f"--env takes KEY=VALUE, got {item!r}")
        env_vars[key] = value
    runtime_env = {"working_dir": str(folder), "excludes": EXCLUDES, "env_vars": env_vars}
    jobs = client(url)
    request = {"entrypoint": shlex.join(command), "runtime_env": runtime_env, "submission_id": submission_id,
               "metadata": {"trustray": " ".join(entry), "config": relative or ""}}
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job_id = jobs.submit_job(**request)
            break
        except RuntimeError as error:
            # A cluster that has just started answers this until its job agent is up; no job was created.
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise SystemExit(f"the cluster at {url} refused the job: {error}") from None
            logger.info("the cluster's job agent is not up yet; retrying")
            time.sleep(2)
    print(f"submitted {job_id} to {url}: {shlex.join(command[1:])}", flush=True)
    if not follow:
        return 0
    return follow_logs(jobs, job_id)


def follow_logs(jobs: Any, job_id: str) -> int:
    """Print the job's logs as they come until it ends; the exit code of its final status."""
    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nstopped following {job_id}; it keeps running (trustray jobs logs {job_id} --follow, "
              f"trustray jobs stop {job_id})", flush=True)
        return 130
    status = wait_for_end(jobs, job_id)
    print(f"job {job_id} {status}", flush=True)
    return EXIT_CODES.get(status, 1)


def wait_for_end(jobs: Any, job_id: str, timeout_s: float = 60) -> str:
    """The job's terminal status (the log stream can end a moment before the status is written)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(jobs.get_job_status(job_id).value)
        if status in EXIT_CODES or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def list_jobs(address: str | None) -> int:
    jobs = client(address).list_jobs()
    rows = [("SUBMISSION ID", "STATUS", "STARTED", "ENTRYPOINT")]
    for job in sorted(jobs, key=lambda job: job.start_time or 0):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else ""
        rows.append((job.submission_id or job.job_id or "", str(job.status.value), started, job.entrypoint))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for row in rows:
        print("  ".join(value.ljust(width) for value, width in zip(row[:3], widths, strict=True)) + "  " + row[3])
    return 0


def job_logs(address: str | None, job_id: str, follow: bool) -> int:
    jobs = client(address)
    if follow:
        return follow_logs(jobs, job_id)
    sys.stdout.write(jobs.get_job_logs(job_id))
    return 0


def stop_job(address: str | None, job_id: str, wait: bool) -> int:
    jobs = client(address)
    if not jobs.stop_job(job_id):
        status = str(jobs.get_job_status(job_id).value)
        print(f"job {job_id} was not running ({status})", flush=True)
        return 0
    if wait:
        print(f"job {job_id} {wait_for_end(jobs, job_id)}", flush=True)
    else:
        print(f"asked {job_id} to stop", flush=True)
    return 0
