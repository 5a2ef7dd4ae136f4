"""`trustray.models.loading`: the one device rule and the one causal-LM loader."""

from __future__ import annotations

import pytest
import torch

from trustray.models.loading import (
    DeviceUnavailableError,
    gpu_or_cpu,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)


def test_auto_takes_the_gpu_only_when_one_is_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == resolve_device("auto") == torch.device("cpu")
    assert gpu_or_cpu(False) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device() == torch.device("cuda")
    assert gpu_or_cpu(True) == torch.device("cuda")


@pytest.mark.parametrize("asked", ["cuda", "cuda:1", torch.device("cuda")])
def test_a_gpu_asked_for_and_missing_is_an_error_not_a_cpu_fallback(monkeypatch, asked):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="no CUDA GPU is visible"):
        resolve_device(asked)
    with pytest.raises(DeviceUnavailableError):
        gpu_or_cpu(True)


def test_dtype_auto_follows_the_device():
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) is torch.float16
    assert resolve_dtype(torch.bfloat16, torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float33", torch.device("cpu"))


def test_load_causal_lm_gives_an_eval_model_in_the_asked_dtype(tiny_llama_dir):
    model = load_causal_lm(str(tiny_llama_dir), "cpu", "bfloat16")
    assert not model.training and next(model.parameters()).dtype is torch.bfloat16
    assert next(model.parameters()).device == torch.device("cpu")
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    ids = tokenizer("hello world", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[:2] == ids.shape


def test_seq2seq_loads_only_when_allowed(tiny_t5_dir):
    model = load_causal_lm(str(tiny_t5_dir), "cpu", seq2seq_ok=True)
    assert model.config.is_encoder_decoder
    with pytest.raises(ValueError):
        load_causal_lm(str(tiny_t5_dir), "cpu")
