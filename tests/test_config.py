"""load_config: YAML plus dotted command-line overrides into strict pydantic models."""

from __future__ import annotations

import pytest
from pydantic import Field, ValidationError

from trustray.config import ActorResources, BaseConfig, load_config, parse_overrides
from trustray.models.engines import EngineConfig


class Optimizer(BaseConfig):
    lr: float = Field(1e-3, gt=0)
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999])
    name: str = "adam"


class Train(BaseConfig):
    steps: int = 10
    fp16: bool = False
    tags: list[str] = Field(default_factory=list)
    optimizer: Optimizer = Field(default_factory=Optimizer)
    resources: ActorResources = Field(default_factory=ActorResources)


@pytest.fixture()
def yaml_file(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("steps: 100\ntags: [a, b]\noptimizer:\n  lr: 0.01\n  name: sgd\nresources:\n  num_cpus: 0.5\n")
    return path


def test_defaults_without_file_or_overrides():
    assert load_config(Train) == Train()


def test_yaml_file(yaml_file):
    config = load_config(Train, yaml_file)
    assert config.steps == 100 and config.tags == ["a", "b"]
    assert config.optimizer == Optimizer(lr=0.01, name="sgd")
    assert config.resources.num_cpus == 0.5


def test_overrides_merge_into_nested_yaml(yaml_file):
    config = load_config(Train, str(yaml_file), ["optimizer.lr=0.5", "fp16=true", "resources.num_gpus=1"])
    assert config.optimizer.lr == 0.5
    assert config.optimizer.name == "sgd"  # siblings from the file survive
    assert config.fp16 is True and config.steps == 100
    assert config.resources.num_cpus == 0.5 and config.resources.num_gpus == 1.0


def test_override_values_are_typed():
    config = load_config(Train, overrides=["steps=7", "optimizer.lr=1e-4", "optimizer.betas=[0.5, 0.6]", "tags=[x]"])
    assert config.steps == 7 and isinstance(config.steps, int)
    assert config.optimizer.lr == pytest.approx(1e-4)
    assert config.optimizer.betas == [0.5, 0.6]
    assert config.tags == ["x"]
    assert load_config(Train, overrides=["optimizer.name="]).optimizer.name == ""
    assert load_config(Train, overrides=["optimizer.name=a=b"]).optimizer.name == "a=b"  # split at the first =


def test_numeric_looking_string_override():
    assert load_config(Train, overrides=["optimizer.name=2024"]).optimizer.name == "2024"


def test_later_override_wins():
    assert load_config(Train, overrides=["steps=1", "steps=2"]).steps == 2


@pytest.mark.parametrize(
    "overrides, where",
    [(["stpes=3"], "stpes"), (["optimizer.momentum=0.9"], "optimizer.momentum")],
)
def test_unknown_keys_are_rejected_readably(overrides, where):
    with pytest.raises(ValidationError) as error:
        load_config(Train, overrides=overrides)
    message = str(error.value)
    assert where in message and "Extra inputs are not permitted" in message


def test_unknown_key_in_yaml_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optimizer:\n  lr: 0.1\n  nesterov: true\n")
    with pytest.raises(ValidationError, match="optimizer.nesterov"):
        load_config(Train, path)


def test_wrong_types_and_bounds_are_rejected():
    with pytest.raises(ValidationError, match="steps"):
        load_config(Train, overrides=["steps=many"])
    with pytest.raises(ValidationError, match="optimizer.lr"):
        load_config(Train, overrides=["optimizer.lr=-1"])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(Train, tmp_path / "absent.yaml")


def test_yaml_must_hold_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(Train, path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(Train, empty) == Train()


@pytest.mark.parametrize(
    "override, message",
    [
        ("steps", "not of the form"),
        ("optimizer..lr=1", "empty key"),
        ("=3", "empty key"),
        ("optimizer.=1", "empty key"),
    ],
)
def test_malformed_overrides(override, message):
    with pytest.raises(ValueError, match=message):
        parse_overrides([override])
    with pytest.raises(ValueError, match=message):
        load_config(Train, overrides=[override])


def test_conflicting_overrides():
    with pytest.raises(ValueError, match="conflicts"):
        parse_overrides(["optimizer=1", "optimizer.lr=2"])


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.b.d=x", "e=[1, 2]"]) == {"a": {"b": {"c": 1, "d": "x"}}, "e": [1, 2]}


def test_engine_config_from_overrides():
    config = load_config(EngineConfig, overrides=["model=/models/x", "engine=hf", "max_model_len=256"])
    assert (config.model, config.engine, config.max_model_len) == ("/models/x", "hf", 256)
    with pytest.raises(ValidationError, match="engine"):
        load_config(EngineConfig, overrides=["engine=tensorrt"])


def test_presets_resolve_from_any_directory(tmp_path, monkeypatch, caplog):
    # An installed trustray (a cluster's image) run outside the source tree still finds `configs/...` presets.
    from trustray.config import PACKAGED_CONFIGS
    from trustray.pipelines.build_index import BuildIndexConfig

    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO", logger="trustray.config"):
        config = load_config(BuildIndexConfig, "configs/build_index/tiny.yaml")
    assert config.limit == 50 and "shipped with trustray" in caplog.text
    (tmp_path / "configs" / "build_index").mkdir(parents=True)
    (tmp_path / "configs" / "build_index" / "tiny.yaml").write_text("limit: 7\n")
    assert load_config(BuildIndexConfig, "configs/build_index/tiny.yaml").limit == 7  # a local file comes first
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(BuildIndexConfig, "configs/build_index/no-such-preset.yaml")
    assert (PACKAGED_CONFIGS / "serve" / "cpu.yaml").is_file()


def test_the_wheel_ships_every_preset(tmp_path):
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # a copy: building writes build/ next to the sources
    shutil.copytree(root, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "outputs", "benchmarks", "tests", "docs", "*.pyc", "__pycache__", "build", "dist"))
    uv = Path(sys.executable).with_name("uv")
    subprocess.run([str(uv), "build", "--wheel", "--out-dir", str(tmp_path / "dist"), str(source)], check=True,
                   capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("trustray-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("trustray/configs/")}
    presets = {f"trustray/configs/{path.relative_to(root / 'trustray' / 'configs')}"
               for path in (root / "trustray" / "configs").glob("*/*.yaml")}
    assert presets and shipped == presets
