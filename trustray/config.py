"""Typed configs: pydantic models loaded from YAML with dotted command-line overrides.

Algorithm settings and resources are kept in separate models so the same algorithm config runs
unchanged on a laptop and on a GPU cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field

ConfigT = TypeVar("ConfigT", bound="BaseConfig")


class BaseConfig(BaseModel):
    """Base of every trustray config: unknown keys are errors, not silently ignored."""

    # Overrides are parsed as YAML, so `name=2024` arrives as an int: let str fields take numbers.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), coerce_numbers_to_str=True)


class Resources(BaseConfig):
    """Ray resources for one actor, replica or worker; never part of an algorithm config."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per actor/replica (fractions allowed).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per actor/replica (fractions allowed).")


class TrainWorkerResources(BaseConfig):
    """The one Ray Train worker of a training pipeline; kept apart from the algorithm settings."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved for the worker.")
    use_gpu: bool = Field(False, description="One GPU for the worker.")
    torch_threads: int = Field(1, ge=1, description="torch threads in the worker.")


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


def load_config(cls: type[ConfigT], path: str | Path | None = None, overrides: list[str] | None = None) -> ConfigT:
    """Build `cls` from an optional YAML file plus dotted overrides; raises a readable error on bad keys."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping at its top level")
        data = loaded
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    return cls.model_validate(data)
