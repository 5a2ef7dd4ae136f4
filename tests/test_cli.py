"""The `trustray` command line: argument handling and dispatch to pipelines."""

import json
from pathlib import Path

import pytest

from trustray import cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_serve_takes_a_config_then_overrides_or_the_other_way_round():
    for argv in (["serve", "--config", "f.yaml", "a=1", "b.c=x"], ["serve", "a=1", "b.c=x", "--config", "f.yaml"]):
        args = cli.build_parser().parse_args(argv)
        assert args.config == "f.yaml" and args.overrides == ["a=1", "b.c=x"]


def test_subcommands_pass_their_arguments_through():
    args = cli.build_parser().parse_args(["run", "build_index", "--config", "f.yaml", "limit=3"])
    assert args.pipeline == "build_index" and args.args == ["--config", "f.yaml", "limit=3"]
    args = cli.build_parser().parse_args(["eval", "rag", "top_k=2"])
    assert args.what == "rag" and args.args == ["top_k=2"]


def test_unknown_pipeline_names_the_available_ones():
    with pytest.raises(SystemExit, match="build_index"):
        cli.main(["run", "no_such_pipeline"])


def test_an_evaluation_runs_one_way_only():
    with pytest.raises(SystemExit, match="trustray eval rag"):
        cli.main(["run", "eval_rag"])


def test_presets_exist_for_the_quickstart():
    assert cli.preset("build_index").is_file() and cli.preset("serve").is_file()
    with pytest.raises(SystemExit, match="not found"):
        cli.preset("serve", "no-such-preset")


def test_run_build_index_from_the_command_line(tmp_path, tiny_embedder_dir, ray_local):
    output = tmp_path / "index"
    code = cli.main(
        ["run", "build_index", "--config", str(CONFIGS / "build_index/tiny.yaml"), f"output_dir={output}",
         f"embedder.model={tiny_embedder_dir}", "limit=12"]
    )
    assert code == 0
    metadata = json.loads((output / "metadata.json").read_text())
    assert metadata["num_docs"] == 12 and metadata["num_passages"] >= 12


@pytest.mark.parametrize("folder", sorted(path.name for path in CONFIGS.iterdir() if path.is_dir()))
def test_every_preset_validates_against_its_pipeline_config(folder):
    from trustray.config import load_config
    from trustray.pipelines import load_pipeline
    from trustray.serve_apps.config import ServeConfig
    from trustray.serve_apps.labeling import LabelingConfig

    apps = {"serve": ServeConfig, "labeling": LabelingConfig}
    config_cls = apps[folder] if folder in apps else load_pipeline(folder)["config"]
    for path in sorted((CONFIGS / folder).glob("*.yaml")):
        load_config(config_cls, path)  # unknown keys and bad values raise


def test_every_evaluation_is_a_pipeline_with_a_table():
    from trustray.pipelines import EVALUATIONS, load_pipeline

    for name in EVALUATIONS.values():
        spec = load_pipeline(name)
        assert callable(spec["table"]) and "config" in spec
