"""CPU embedding with ONNX Runtime and int8 weights: the `onnx-int8` backend of `trustray.models.embedders`.

The sentence-transformers model's transformer is exported to ONNX once per weights fingerprint, its linear layers
quantized to int8 (one scale per output channel) with dynamic (per-batch) activation scales, and cached under `$TRUSTRAY_CACHE/onnx/` (a file
lock lets parallel actors share one export). Pooling and normalisation are the model's own settings, applied in
numpy. Activation scales are computed per batch, so a vector moves a little with its batch-mates. Vectors differ
slightly from the float32 model's, so an index records the backend in its embedder
fingerprint and a query embedder of another backend is refused; the recall lost is measured by
`benchmarks/index_build.py --backend onnx-int8`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trustray.artifacts import atomic_folder, read_metadata, write_metadata
from trustray.models.sources import cache_dir

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
KIND = "onnx_int8_encoder"
OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
POOLING_MODES = ("mean", "cls")


def _structure(model: Any) -> tuple[str, bool]:
    """(pooling mode, whether the model normalises) of a Transformer → Pooling → [Normalize] model; others are
    refused rather than embedded differently from the torch backend."""
    modules = [type(module).__name__ for module in model]
    if modules not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise ValueError(f"the onnx-int8 backend supports Transformer -> Pooling [-> Normalize] models, not {modules}")
    pooling = model[1].get_config_dict()
    if pooling.get("pooling_mode") not in POOLING_MODES or not pooling.get("include_prompt", True):
        raise ValueError(f"the onnx-int8 backend supports {POOLING_MODES} pooling, not {pooling}")
    return pooling["pooling_mode"], modules[-1] == "Normalize"


def export_int8(model: Any, fingerprint: str) -> Path:
    """The cached int8 ONNX file of `model` (a SentenceTransformer), exported and quantized on first use."""
    import torch
    from filelock import FileLock

    folder = cache_dir() / "onnx" / f"{fingerprint}-int8"
    expected = {"kind": KIND, "fingerprint": fingerprint, "opset": OPSET, "torch": torch.__version__,
                "per_channel": True}
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        found = read_metadata(folder)
        if found is not None and all(found.get(key) == value for key, value in expected.items()):
            return folder / MODEL_FILE
        from onnxruntime.quantization import QuantType, quantize_dynamic

        transformer = model[0].auto_model.eval()
        inputs = [name for name in INPUTS if name in model.tokenizer.model_input_names]

        class HiddenStates(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.transformer = transformer

            def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
                return self.transformer(**dict(zip(inputs, tensors, strict=True))).last_hidden_state

        sample = model.tokenizer(["an example", "a second, longer example"], padding=True, return_tensors="pt")
        axes = {name: {0: "batch", 1: "tokens"} for name in [*inputs, "hidden"]}
        logger.info("exporting %s to int8 ONNX in %s (once)", fingerprint, folder)
        with atomic_folder(folder) as tmp:
            with torch.no_grad(), warnings.catch_warnings():
                # The tracer warns about shape checks it freezes; the axes that vary are declared dynamic.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                torch.onnx.export(HiddenStates(), tuple(sample[name] for name in inputs), str(tmp / "fp32.onnx"),
                                  input_names=inputs, output_names=["hidden"], dynamic_axes=axes,
                                  opset_version=OPSET, dynamo=False)
            # Per output channel: one scale per row of each weight matrix keeps the vectors far closer to the
            # float32 ones than one scale per matrix (benchmarks/index_build.py --compare-backends measures it).
            quantize_dynamic(str(tmp / "fp32.onnx"), str(tmp / MODEL_FILE), weight_type=QuantType.QInt8,
                             per_channel=True)
            (tmp / "fp32.onnx").unlink()
            write_metadata(tmp, {**expected, "inputs": inputs})
    return folder / MODEL_FILE


class OnnxInt8Encoder:
    """`encode` like a SentenceTransformer's, through ONNX Runtime with int8 weights."""

    def __init__(self, model: Any, fingerprint: str, threads: int | None = None):
        import onnxruntime

        self.pooling, self.normalizes = _structure(model)
        self.tokenizer = model.tokenizer
        self.max_length = model.max_seq_length
        path = export_int8(model, fingerprint)
        self.inputs = read_metadata(path.parent)["inputs"]
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def encode(self, texts: Sequence[str], batch_size: int, normalize: bool) -> np.ndarray:
        """Vectors in the order of `texts`; batches are made of texts of similar length (less padding)."""
        order = np.argsort([-len(text) for text in texts], kind="stable")
        vectors: list[np.ndarray] = []
        for start in range(0, len(texts), batch_size):
            batch = [texts[i] for i in order[start:start + batch_size]]
            encoded = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="np")
            hidden = self.session.run(None, {name: encoded[name].astype(np.int64) for name in self.inputs})[0]
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = encoded["attention_mask"][..., None].astype(np.float32)
                pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
            if normalize or self.normalizes:
                pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
            vectors.append(pooled.astype(np.float32))
        result = np.empty((len(texts), vectors[0].shape[1]), dtype=np.float32)
        result[order] = np.concatenate(vectors)
        return result
