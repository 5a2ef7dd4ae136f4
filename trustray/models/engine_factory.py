"""Builds the engine a config names: the one module that imports the backends (they import only the protocol)."""

from __future__ import annotations

import torch

from trustray.models.engines import Engine, EngineConfig
from trustray.models.hf_engine import HFEngine


def vllm_available() -> bool:
    """True when vllm imports and a CUDA GPU is visible (the only case `engine: auto` picks vLLM)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def build_engine(config: EngineConfig) -> Engine:
    """Build the engine named by `config.engine` (`auto`: vLLM when available, else transformers)."""
    choice = config.engine
    if choice == "auto":
        choice = "vllm" if vllm_available() else "hf"
    if choice == "vllm":
        from trustray.models.vllm_engine import VLLMEngine

        return VLLMEngine(config)
    return HFEngine(config)
