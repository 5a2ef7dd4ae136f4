"""Model sources (local folder, HF id, built-in conversion with its cache checks) and the tiny model factory."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trustray.models import sources
from trustray.models.sources import DEFAULT_CHAT_MODEL, model_fingerprint, resolve_model_source, sha256_file
from trustray.models.tiny import train_tokenizer

# -- resolve_model_source ---------------------------------------------------------------------------


def test_local_folder_resolves_to_its_absolute_path(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    assert resolve_model_source(str(folder)) == str(folder.resolve())
    monkeypatch.chdir(tmp_path)
    assert resolve_model_source("model") == str(folder.resolve())


@pytest.mark.parametrize("missing", ["./no-such-model", "/no/such/model", "~/no-such-trustray-model"])
def test_missing_local_path_is_an_error(missing):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        resolve_model_source(missing)


def test_a_file_is_not_a_model_folder(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ValueError, match="give the model's folder"):
        resolve_model_source(str(weights))


def test_hf_id_passes_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_fingerprint_of_a_local_folder_is_stable_and_follows_the_weights(tiny_llama_dir, tmp_path):
    import shutil

    first = model_fingerprint(tiny_llama_dir)
    assert first == model_fingerprint(tiny_llama_dir) and len(first) == 16
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    with open(copy / "model.safetensors", "r+b") as handle:  # same size, different first bytes
        handle.seek(100)
        handle.write(b"\x00" * 8)
    assert model_fingerprint(str(copy)) != first


def write_converted(folder: Path, weights: bytes = b"weights") -> None:
    """A folder shaped like a converted built-in: weights plus a manifest naming their hash."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(weights)
    manifest = {"weights_sha256": sha256_file(folder / "model.safetensors"), "conversion_version": 1}
    (folder / "trustray_manifest.json").write_text(json.dumps(manifest))


def test_manifest_check_detects_damage(tmp_path):
    folder = tmp_path / "converted"
    write_converted(folder)
    assert sources._manifest_ok(folder)
    (folder / "model.safetensors").write_bytes(b"weightz")
    assert not sources._manifest_ok(folder)
    write_converted(folder)
    (folder / "trustray_manifest.json").write_text('{"weights_sha')  # truncated write
    assert not sources._manifest_ok(folder)
    write_converted(folder)
    manifest = json.loads((folder / "trustray_manifest.json").read_text())
    (folder / "trustray_manifest.json").write_text(json.dumps({**manifest, "conversion_version": 0}))
    assert not sources._manifest_ok(folder)
    assert not sources._manifest_ok(tmp_path / "absent")


# -- tiny model factory -----------------------------------------------------------------------------


def test_tiny_llama_loads_with_auto_classes(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.chat_template is not None
    ids = tokenizer("The capital of France", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))


def test_tiny_bert_loads_with_auto_classes_and_as_a_sentence_transformer(tiny_embedder_dir):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    assert type(AutoModel.from_pretrained(tiny_embedder_dir)).__name__ == "BertModel"
    tokenizer = AutoTokenizer.from_pretrained(tiny_embedder_dir)
    assert tokenizer("paris")["input_ids"][0] == tokenizer.cls_token_id
    embeddings = SentenceTransformer(tiny_embedder_dir, device="cpu").encode(["Paris is a city.", "Rome"])
    assert embeddings.shape == (2, 32)


def test_tiny_t5_loads_with_auto_classes(tiny_t5_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir)
    assert type(model).__name__ == "T5ForConditionalGeneration"
    assert tokenizer.pad_token == "<pad>"
    batch = tokenizer(["Compress: The capital of France is Paris."], return_tensors="pt")
    output = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert output.shape[0] == 1 and 1 < output.shape[1] <= 5


@pytest.mark.parametrize(
    "text",
    ["The capital of France is Paris.", "Zürich – 北京, 1889!\n\ttabs  and  spaces", "<|im_start|>user\nhi<|im_end|>"],
)
def test_bpe_tokenizer_round_trips_text(text):
    tokenizer = train_tokenizer("bpe")
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_wordpiece_tokenizer_round_trips_lowercased_text():
    tokenizer = train_tokenizer("wordpiece")
    ids = tokenizer.encode("The Capital of France, Paris.")
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the capital of france, paris."


def test_tokenizer_kind_is_checked():
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        train_tokenizer("sentencepiece")


# -- the built-in chat model (converted from GGUF: ~30 s per conversion) ------------------------------

_RESOLVE = (
    "import logging, sys\n"
    "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
    "from trustray.models.sources import resolve_model_source\n"
    f"print(resolve_model_source({DEFAULT_CHAT_MODEL!r}))\n"
)


@pytest.fixture(scope="module")
def converted_cache(tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    """A fresh cache that two processes filled at the same time: (cache, their outputs, their logs)."""
    cache = tmp_path_factory.mktemp("trustray-cache")
    env = {**os.environ, "TRUSTRAY_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen([sys.executable, "-c", _RESOLVE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [worker.communicate(timeout=280) for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), [err[-2000:] for _, err in results]
    return cache, [out.strip() for out, _ in results], [err for _, err in results]


@pytest.fixture()
def builtin_cache(converted_cache, monkeypatch):
    """Point the cache at `converted_cache` with the per-process memo of the prepared model cleared."""
    cache = converted_cache[0]
    monkeypatch.setenv("TRUSTRAY_CACHE", str(cache))
    sources._prepare_builtin_chat_model.cache_clear()
    yield cache
    sources._prepare_builtin_chat_model.cache_clear()


@pytest.mark.slow
def test_two_processes_convert_once(converted_cache):
    cache, outputs, logs = converted_cache
    target = str(cache / "models" / DEFAULT_CHAT_MODEL)
    assert outputs == [target, target]
    assert sum(log.count("converting") for log in logs) == 1


@pytest.mark.slow
def test_builtin_chat_model_resolves_and_verifies(builtin_cache, caplog):
    from transformers import AutoConfig, AutoTokenizer

    caplog.set_level(logging.INFO, logger=sources.__name__)
    path = Path(resolve_model_source(DEFAULT_CHAT_MODEL))
    assert path == builtin_cache / "models" / DEFAULT_CHAT_MODEL
    assert "converting" not in caplog.text  # the verified cache is reused
    manifest = json.loads((path / "trustray_manifest.json").read_text())
    assert manifest["weights_sha256"] == sha256_file(path / "model.safetensors")
    assert model_fingerprint(DEFAULT_CHAT_MODEL) == manifest["weights_sha256"][:16]
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert AutoConfig.from_pretrained(path).eos_token_id == tokenizer.eos_token_id
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


@pytest.mark.slow
def test_corrupted_cache_is_detected_and_reconverted(builtin_cache, caplog):
    path = builtin_cache / "models" / DEFAULT_CHAT_MODEL
    weights = path / "model.safetensors"
    good = sha256_file(weights)
    with open(weights, "r+b") as handle:  # flip bytes in the middle: same size, different content
        handle.seek(weights.stat().st_size // 2)
        handle.write(b"\xff" * 16)
    caplog.set_level(logging.INFO, logger=sources.__name__)
    assert resolve_model_source(DEFAULT_CHAT_MODEL) == str(path)
    assert "failed its hash check" in caplog.text and "converting" in caplog.text
    assert sha256_file(weights) == good  # the conversion is deterministic
    assert sources._manifest_ok(path)
