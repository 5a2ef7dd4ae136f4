"""Ray Data / Ray Train jobs, one module per pipeline, each runnable as `python -m trustray.pipelines.X`.

Convention: every pipeline module defines `PIPELINE = {"config": <PipelineConfig subclass>, "run": run}` where
`run(config)` does the work (connecting to Ray itself) and returns the artifact path or summary, and ends with
`if __name__ == "__main__": run_module(NAME)`. An evaluation's spec also has `"table"` (summary -> the text
table `trustray eval` prints) and may have `"flags"` (its own command-line flags -> config overrides).

The registry below is the list of what the command line runs: `trustray run NAME` runs a job of `JOBS`,
`trustray eval WHAT` an evaluation of `EVALUATIONS` (which also prints its table). Adding a pipeline is one
module and one line here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trustray.config import BaseConfig, PipelineConfig, load_config
from trustray.runtime import setup_logging

logger = logging.getLogger(__name__)

PipelineSpec = dict[str, Any]


# `trustray run NAME`: jobs that build or train an artifact.
JOBS = ("build_index", "compressor_train", "abstractive_train", "edit_train", "edit_apply", "influence",
        "active_preference", "weak_to_strong")
# `trustray eval WHAT`: evaluations (their PIPELINE spec also has a "table"), keyed by WHAT.
EVALUATIONS = {"rag": "eval_rag", "edit": "eval_edit", "influence": "eval_influence"}


def pipeline_module(name: str) -> Any:
    """The module of a registered pipeline (a job or an evaluation's module name)."""
    if name not in JOBS and name not in EVALUATIONS.values():
        raise ValueError(f"unknown pipeline {name!r}; jobs: {', '.join(JOBS)}; evaluations: "
                         f"{', '.join(f'{what} ({module})' for what, module in EVALUATIONS.items())}")
    return importlib.import_module(f"trustray.pipelines.{name}")


def prepare_output(config: PipelineConfig) -> Path:
    """The run's output folder; with `force`, whatever it holds is deleted first (the one place `force` acts)."""
    folder = config.output_path()
    if config.force and folder.exists():
        logger.warning("force=true: deleting %s and starting over", folder)
        shutil.rmtree(folder)
    return folder


def load_pipeline(name: str) -> PipelineSpec:
    """The `PIPELINE` spec of a registered pipeline, with a readable error for unknown names."""
    module = pipeline_module(name)
    spec = getattr(module, "PIPELINE", None)
    if not isinstance(spec, dict) or not {"config", "run"} <= spec.keys():
        raise ValueError(f"trustray.pipelines.{name} defines no PIPELINE = {{'config': ..., 'run': ...}}")
    if name in EVALUATIONS.values() and "table" not in spec:
        raise ValueError(f"trustray.pipelines.{name} is an evaluation but its PIPELINE has no 'table'")
    return spec


def pipeline_main(pipeline: PipelineSpec, argv: list[str] | None = None, prog: str | None = None) -> Path:
    """Parse `--config FILE` plus `key.sub=value` overrides, connect to Ray, run the pipeline."""
    from trustray.actors.cluster import init_ray

    parser = argparse.ArgumentParser(prog=prog, description=(pipeline["run"].__doc__ or "").strip() or None)
    parser.add_argument("--config", help="YAML preset (e.g. configs/build_index/cpu.yaml)")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as limit=100 embedder.batch_size=32")
    args = parser.parse_intermixed_args(argv)
    setup_logging()
    config_cls: type[BaseConfig] = pipeline["config"]
    config = load_config(config_cls, args.config, args.overrides)
    init_ray(args.address)
    run: Callable[[BaseConfig], Path] = pipeline["run"]
    result = run(config)
    logger.info("done: %s", result)
    return result


def run_module(name: str, argv: list[str] | None = None, prog: str | None = None, log_table: bool = True) -> Any:
    """Run a registered pipeline from command-line arguments (`trustray run`, `trustray eval` and
    `python -m trustray.pipelines.NAME` all end here). An evaluation's own flags (its spec's "flags") become
    overrides, and its table is logged unless `log_table` is false."""
    spec = load_pipeline(name)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "flags" in spec:
        argv = spec["flags"](argv)
    result = pipeline_main(spec, argv, prog=prog or f"python -m trustray.pipelines.{name}")
    if log_table and "table" in spec:
        logger.info("results:\n%s", spec["table"](result))
    return result


def gather(refs: dict[Any, Any], description: str, on_result: Callable[[Any, Any], None]) -> None:
    """Wait for Ray results as they finish, with a progress bar; `on_result(key, value)` persists each one, so a
    crash loses only the tasks still running."""
    import ray
    from tqdm.auto import tqdm

    pending = {ref: key for key, ref in refs.items()}
    with tqdm(total=len(pending), desc=description) as progress:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(done[0])
            on_result(key, ray.get(done[0]))
            progress.update(1)
