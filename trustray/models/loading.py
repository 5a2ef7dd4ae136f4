"""Loading models: one device rule and one causal-LM loader for every caller outside `trustray/models`.

The device rule: `None` or `"auto"` takes the GPU when one is visible (inside a Ray actor that is what its
`num_gpus` gave it) and the CPU otherwise; asking for `"cuda"` where no GPU is visible is an error, never a
silent fallback to the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trustray.models.sources import resolve_model_source


class DeviceUnavailableError(RuntimeError):
    """A GPU was asked for and none is visible to this process."""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: `None`/`"auto"` picks CUDA when visible, else the CPU; a CUDA device asked for
    and not visible raises `DeviceUnavailableError`."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {str(device)!r} was asked for but no CUDA GPU is visible to this process; give the actor "
            f"or worker a GPU (num_gpus / use_gpu) or ask for the CPU"
        )
    return resolved


def gpu_or_cpu(use_gpu: bool) -> torch.device:
    """`cuda` when the resources ask for a GPU (an error when none is visible), else `cpu`."""
    return resolve_device("cuda" if use_gpu else "cpu")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`"auto"` is bfloat16 on a GPU and float32 on the CPU; a name such as `"float32"` is that dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


def load_tokenizer(source: str) -> Any:
    """The tokenizer of a model source (built-in name, local folder or cached Hugging Face id)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_source(source))


def load_causal_lm(
    source: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    seq2seq_ok: bool = False,
) -> Any:
    """A causal LM (or, with `seq2seq_ok`, an encoder-decoder when the source is one) from a built-in name,
    local folder or cached Hugging Face id, on the device of the device rule, in eval mode (callers that
    train switch it)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = resolve_model_source(source)
    target = resolve_device(device)
    auto = AutoModelForCausalLM
    if seq2seq_ok and AutoConfig.from_pretrained(path).is_encoder_decoder:
        auto = AutoModelForSeq2SeqLM
    return auto.from_pretrained(path, dtype=resolve_dtype(dtype, target)).to(target).eval()


def load_summarizer(folder: str | Path, device: str | torch.device | None = None) -> Any:
    """A summarizer saved by `trustray.core.rag.abstractive.save_summarizer` (seq2seq or causal, as its config
    says), in float32 on the device of the device rule."""
    from trustray.artifacts import read_artifact
    from trustray.core.rag.abstractive import KIND, Summarizer

    metadata = read_artifact(folder, KIND, "summarizer")
    path = str(Path(folder) / "model")
    model = load_causal_lm(path, device, seq2seq_ok=True)
    return Summarizer(model, load_tokenizer(path), metadata["max_input_tokens"], metadata["max_new_tokens"])
