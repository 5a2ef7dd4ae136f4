"""Every command README.md shows runs, exactly as spelled: its arguments parse and its real config file loads.

Commands are taken from the README's shell code blocks (every line must be one), the first column of its
commands table, and inline code that starts like a command. `trustray ...` runs `trustray.cli.main` and
`python -m trustray.pipelines.X ...` runs that module as `__main__`, with the work itself stubbed out: the pipeline's
`run`, the Serve app, Ray. `trustray quickstart` runs for real in tests/test_quickstart.py (slow); the scripts
under scripts/ run in CI (.ci/run).
"""

from __future__ import annotations

import re
import runpy
import shlex
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

from trustray import cli, pipelines
from trustray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PREFIXES = ("trustray ", ".venv/bin/trustray ", "python -m trustray.", "./scripts/")
SHELL_BLOCKS = ("bash", "sh", "shell", "console")


def readme_commands(text: str) -> list[str]:
    """The commands a README shows, in order, each once."""
    found: list[str] = []
    for language, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
        for line in body.splitlines():
            if language not in SHELL_BLOCKS and not line.strip().startswith(PREFIXES):
                continue  # a Python example or a folder tree: only lines that start like a command count
            tokens = shlex.split(line, comments=True)
            if tokens:
                found += [command.strip() for command in " ".join(tokens).split(" && ")]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for row in re.findall(r"^\| *`([^`]+)` *\|", prose, flags=re.M):
        found.append(row.strip())  # the commands table: the first column is the command
    for span in re.findall(r"`([^`]+)`", prose):
        if span.startswith(PREFIXES) or span in ("trustray", ".venv/bin/trustray"):
            found.append(span.strip())
    return list(dict.fromkeys(found))


COMMANDS = readme_commands(README.read_text())


def test_the_extractor_finds_every_kind_of_command():
    text = ("```bash\n./scripts/a.sh && .venv/bin/trustray quickstart   # both\n```\n"
            "| command | options |\n| --- | --- |\n| `trustray run x --config c.yaml` | `key=value` |\n"
            "Run `./scripts/b.sh -m slow` or `python -m trustray.pipelines.x`, not `ray status`.\n"
            "```\ntrustray/\n  core/\n```\n```python\nprint(\"don't\")  # not a command\n```\n")
    assert readme_commands(text) == ["./scripts/a.sh", ".venv/bin/trustray quickstart", "trustray run x --config c.yaml",
                                     "./scripts/b.sh -m slow", "python -m trustray.pipelines.x"]


def test_the_readme_opens_with_the_setup_and_test_commands():
    assert COMMANDS[:3] == ["./scripts/setup.sh", ".venv/bin/trustray quickstart", "./scripts/test.sh"]


def test_the_commands_table_covers_every_job_and_evaluation():
    shown = {tuple(shlex.split(command)[:3]) for command in COMMANDS}
    missing = [f"trustray run {job}" for job in pipelines.JOBS if ("trustray", "run", job) not in shown]
    missing += [f"trustray eval {what}" for what in pipelines.EVALUATIONS if ("trustray", "eval", what) not in shown]
    assert not missing, f"README.md's commands table lacks {missing}"


class Stubbed:
    """What a stubbed command was asked to do: the config its work received."""

    def __init__(self) -> None:
        self.configs: list = []

    def record(self, result):
        def stub(config, *args, **kwargs):
            self.configs.append(config)
            return result
        return stub


def stub_pipeline(monkeypatch, name: str, stubbed: Stubbed) -> dict:
    """Replace the pipeline's work (and Ray, and an evaluation's table) with a recorder; returns its spec."""
    spec = pipelines.load_pipeline(name)
    is_evaluation = name in pipelines.EVALUATIONS.values()
    monkeypatch.setitem(spec, "run", stubbed.record({"stubbed": True} if is_evaluation else ROOT / "outputs"))
    monkeypatch.setattr("trustray.actors.cluster.init_ray", lambda *args, **kwargs: None)
    if "table" in spec:
        monkeypatch.setitem(spec, "table", lambda summary: "stubbed table")
    return spec


def config_and_overrides(args: list[str]) -> tuple[str, list[str]]:
    assert "--config" in args, f"{args}: a README command names its config file"
    at = args.index("--config")
    return args[at + 1], args[:at] + args[at + 2:]


def check_config(recorded: Stubbed, config_cls, folder: str, args: list[str], translate=None) -> None:
    path, rest = config_and_overrides(args)
    assert Path(path).parts[:2] == ("configs", folder), f"{path}: not a preset of configs/{folder}/"
    assert (ROOT / path).is_file(), f"{path} does not exist"
    expected = load_config(config_cls, ROOT / path, translate(rest) if translate else rest)
    assert len(recorded.configs) == 1 and recorded.configs[0] == expected


def run_trustray(argv: list[str], monkeypatch) -> None:
    """`trustray ARGS` through the real entry point, the work stubbed."""
    monkeypatch.chdir(ROOT)
    stubbed = Stubbed()
    command = argv[0]
    if command == "quickstart":
        source = (ROOT / "tests" / "test_quickstart.py").read_text()
        assert '"-m", "trustray.cli", "quickstart"' in source, "tests/test_quickstart.py no longer runs the quickstart"
        assert argv == ["quickstart"], "tests/test_quickstart.py runs `trustray quickstart` with no other options"
        assert cli.build_parser().parse_args(argv).func is cli.cmd_quickstart
        return
    if command == "serve":
        from trustray.serve_apps import openai_app
        from trustray.serve_apps.config import ServeConfig

        monkeypatch.setattr(openai_app, "run_app", stubbed.record("http://127.0.0.1:8000"))
        monkeypatch.setattr(openai_app, "shutdown", lambda: None)
        monkeypatch.setattr(cli, "serve_until_interrupted", lambda url: None)
        assert cli.main(argv) == 0
        check_config(stubbed, ServeConfig, "serve", argv[1:])
        return
    if command == "label":
        from trustray.serve_apps import labeling

        monkeypatch.setattr(labeling, "run_app", stubbed.record("http://127.0.0.1:8000/v1/labels/"))
        monkeypatch.setattr(labeling, "shutdown", lambda: None)
        monkeypatch.setattr(cli, "wait_until_interrupted", lambda message: None)
        assert cli.main(argv) == 0
        check_config(stubbed, labeling.LabelingConfig, "labeling", argv[1:])
        return
    if command in ("run", "eval"):
        assert len(argv) > 1, f"trustray {command} needs a name"
        name = argv[1] if command == "run" else pipelines.EVALUATIONS[argv[1]]
        spec = stub_pipeline(monkeypatch, name, stubbed)
        assert cli.main(argv) == 0
        translate = spec.get("flags") if command == "eval" else None
        check_config(stubbed, spec["config"], name, argv[2:], translate)
        return
    if command in ("submit", "jobs"):
        from trustray import jobs

        cluster = FakeJobClient()
        monkeypatch.setattr(jobs, "client", lambda address: cluster)
        assert cli.main(argv) == 0
        if command == "submit":
            (submitted,) = cluster.submitted
            entrypoint = shlex.split(submitted["entrypoint"])
            assert entrypoint[1:5] == ["-m", "trustray.cli", "run", argv[1]]
            assert submitted["runtime_env"]["working_dir"] == str(ROOT)
            # The job runs `trustray run` with the same config, which must load.
            stub_pipeline(monkeypatch, argv[1], stubbed)
            assert cli.main(entrypoint[3:]) == 0
            check_config(stubbed, pipelines.load_pipeline(argv[1])["config"], argv[1], entrypoint[5:])
        return
    pytest.fail(f"no runner for `trustray {command}`: teach tests/test_readme_commands.py to run it")


class FakeJobClient:
    """Ray's JobSubmissionClient as far as `trustray submit` and `trustray jobs` use it: one job that succeeds."""

    def __init__(self) -> None:
        self.submitted: list[dict] = []

    def submit_job(self, **request) -> str:
        self.submitted.append(request)
        return "raysubmit_readme"

    async def tail_job_logs(self, job_id: str):
        yield "the job's log\n"

    def get_job_status(self, job_id: str):
        from ray.job_submission import JobStatus

        return JobStatus.SUCCEEDED

    def list_jobs(self) -> list:
        return []


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs_as_spelled(command, monkeypatch):
    tokens = shlex.split(command)
    if tokens[0] == ".venv/bin/trustray":
        scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
        assert scripts["trustray"] == "trustray.cli:main"
        run_trustray(tokens[1:], monkeypatch)
    elif tokens[0] == "trustray":
        run_trustray(tokens[1:], monkeypatch)
    elif tokens[:2] == ["python", "-m"] and tokens[2].startswith("trustray.pipelines."):
        monkeypatch.chdir(ROOT)
        name = tokens[2].removeprefix("trustray.pipelines.")
        stubbed = Stubbed()
        spec = stub_pipeline(monkeypatch, name, stubbed)
        # Exactly what `python -m` does: the module runs as __main__ with these arguments.
        monkeypatch.setattr(sys, "argv", [tokens[2], *tokens[3:]])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is already imported
            runpy.run_module(tokens[2], run_name="__main__")
        check_config(stubbed, spec["config"], name, tokens[3:], spec.get("flags"))
    elif tokens[0].startswith("./scripts/"):
        script = ROOT / tokens[0]
        assert script.is_file() and script.stat().st_mode & 0o111, f"{tokens[0]} is not an executable script"
        ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
        if tokens[0] == "./scripts/setup.sh":
            test_script = (ROOT / "scripts" / "test.sh").read_text().splitlines()
            assert "./scripts/setup.sh" in test_script and "./scripts/test.sh" in ci, "CI no longer runs setup.sh"
            assert tokens == ["./scripts/setup.sh"]
        else:
            assert command in ci, f"CI (.ci/run) does not run `{command}` as the README spells it"
    else:
        pytest.fail(f"no runner for `{command}`: teach tests/test_readme_commands.py to run it")
