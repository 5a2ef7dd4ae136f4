"""Typed configs: pydantic models loaded from YAML with dotted command-line overrides.

Algorithm settings and resources are kept in separate models so the same algorithm config runs
unchanged on a laptop and on a GPU cluster.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

ConfigT = TypeVar("ConfigT", bound="BaseConfig")


class BaseConfig(BaseModel):
    """Base of every trustray config: unknown keys are errors, not silently ignored."""

    # Overrides are parsed as YAML, so `name=2024` arrives as an int: let str fields take numbers.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), coerce_numbers_to_str=True)


class ActorResources(BaseConfig):
    """Ray resources of one actor, Serve replica or task; never part of an algorithm config."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved (fractions allowed; keep them fractional on small "
                            "machines, or whole-CPU actors starve Ray Data's other tasks).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved (fractions allowed).")
    torch_threads: int | None = Field(None, ge=1, description="torch threads in the process (None: torch's default; "
                                      "more threads than free cores makes torch many times slower).")
    custom_resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources (name -> "
                                               "amount) to reserve too, e.g. one a group of nodes declares, so the "
                                               "actor runs on those nodes.")

    def ray_options(self) -> dict[str, Any]:
        """`num_cpus`, `num_gpus` and (when any) `resources`: keyword arguments of Ray's `.options()`/`remote()`
        and of Ray Data's `map_batches`."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.custom_resources:
            options["resources"] = dict(self.custom_resources)
        return options


class PoolResources(ActorResources):
    """An actor pool (Ray Data `ActorPoolStrategy`): `size` actors, each with the resources above."""

    size: int = Field(2, ge=1, description="Actors in the pool (each loads its own model).")
    num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per actor. Keep it fractional on small machines: "
                            "whole-CPU actors can take every CPU and starve Ray Data's read tasks, which then hang.")


class TrainWorkerResources(BaseConfig):
    """The Ray Train workers of a training pipeline; kept apart from the algorithm settings."""

    num_workers: int = Field(1, ge=1, description="Data-parallel workers (DDP when more than one).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per worker.")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    torch_threads: int = Field(1, ge=1, description="torch threads per worker.")
    custom_resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per worker "
                                               "(name -> amount), e.g. one a group of nodes declares.")


class PipelineConfig(BaseConfig):
    """Base of every pipeline's config: a run name, the folder its artifacts go to, and `force`.

    Subclasses set `output_root`; the default folder is `<output_root>/<name>`.
    """

    output_root: ClassVar[str]

    name: str = Field("default", description="Run name; the default output folder is <output_root>/<name>.")
    output_dir: str | None = Field(None, description="Artifact folder (default <output_root>/<name>).")
    force: bool = Field(False, description="Delete what output_dir holds and start over (default: reuse or resume "
                        "a run made with the same settings, refuse one made with other settings).")

    def output_path(self) -> Path:
        return Path(self.output_dir or f"{self.output_root}/{self.name}")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn `a.b=1 c=x` into a nested dict; values are parsed as YAML scalars (numbers, bools, lists)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        if not all(keys):
            raise ValueError(f"override {item!r} has an empty key")
        node = nested
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with another override")
        node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return nested


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """`path` when it is a file; else, for `configs/<pipeline>/<preset>.yaml`, the preset shipped in the package
    (an installed trustray run from any directory, a cluster's image), logged; else FileNotFoundError."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_absolute() and path.parts[:1] == ("configs",):
        packaged = PACKAGED_CONFIGS.joinpath(*path.parts[1:])
        if packaged.is_file():
            logger.info("config %s is not in %s: using the preset shipped with trustray, %s", path, Path.cwd(),
                        packaged)
            return packaged
    raise FileNotFoundError(f"config file not found: {path}")


def load_config(cls: type[ConfigT], path: str | Path | None = None, overrides: list[str] | None = None) -> ConfigT:
    """Build `cls` from an optional YAML file plus dotted overrides; raises a readable error on bad keys."""
    data: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping at its top level")
        data = loaded
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    return cls.model_validate(data)
