"""Edit sets: the weight change an editor produced for a batch of factual edits, as a self-describing artifact.

An edit set maps module names (as in `model.named_modules()`, e.g. `model.layers.29.mlp.down_proj`) to deltas
shaped like that module's `weight`. It is what travels between the editor (which computes it), the serving
engines (which apply it, or load it as a LoRA adapter) and the evaluations (which apply and revert it many times
on one loaded model). Hence:

- a folder layout that names everything needed to trust it on reuse:

      deltas.safetensors   the deltas, contiguous CPU tensors
      scope.safetensors    only for a scoped set (`trustray.core.editing.scope`): the edit keys per module
      metadata.json        caller metadata (edits, base model fingerprint, editor, metrics) plus `kind`,
                           `format`, module names with shapes and dtypes, the sha256 of each tensor file,
                           a scoped set's `scope_threshold`, and `created_at` (when the folder was written)

- `apply` keeps the original weights so `revert` restores them bit for bit, even in bf16/fp16 where
  `W + d - d != W`; an evaluation that applies and reverts thousands of edit sets never drifts (a scoped set is
  applied as forward hooks instead, and the weights are never touched);
- `to_lora` / `save_as_peft_adapter` turn a delta into the LoRA format peft and vLLM's multi-LoRA serving load,
  so many edit sets can be served side by side on one base model.
"""

from __future__ import annotations

import hashlib
import json
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.hooks import RemovableHandle

from trustray.artifacts import (
    ArtifactMismatchError,
    atomic_folder,
    check_metadata,
    read_metadata,
    write_metadata,
)
from trustray.core.editing.scope import EditScope, check_unscoped

KIND = "edit_set"
FORMAT = "trustray-edit-set/1"
DELTAS_FILE = "deltas.safetensors"
SCOPE_FILE = "scope.safetensors"
FINGERPRINT_KEY = "base_model_fingerprint"
RESERVED_KEYS = frozenset({"kind", "format", "modules", "deltas_sha256", "scope_threshold", "scope_sha256"})
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_KIND = "lora_adapter_from_edit_set"


class CorruptArtifactError(ValueError):
    """An artifact's files do not match the checksums its metadata recorded (partial copy, disk error, edit)."""


@dataclass(eq=False)
class EditSet:
    """Weight deltas keyed by module name, plus JSON-serialisable metadata describing how they were made.

    `metadata` should carry `base_model_fingerprint` (checked by `compose` and, via `expected`, by `load`);
    the keys in `RESERVED_KEYS` are reserved for what `save` records itself. With a `scope`, each delta acts only
    at the positions its edit keys cover.
    """

    deltas: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    scope: EditScope | None = None

    def __post_init__(self) -> None:
        for name, delta in self.deltas.items():
            if not isinstance(name, str) or not isinstance(delta, torch.Tensor):
                raise TypeError(f"edit set deltas map module names to tensors; got {name!r}: {type(delta).__name__}")
        reserved = sorted(RESERVED_KEYS & self.metadata.keys())
        if reserved:
            raise ValueError(f"edit set metadata keys {reserved} are reserved for what `save` records itself")
        if self.scope is not None:
            self.scope.check_covers(self.deltas)

    @property
    def fingerprint(self) -> str | None:
        """The base model fingerprint the deltas were computed for (None when the editor did not record one)."""
        return self.metadata.get(FINGERPRINT_KEY)

    def save(self, folder: str | Path) -> dict[str, Any]:
        """Write the edit set to `folder` atomically (whole or not at all); returns the metadata written."""
        try:
            json.dumps(self.metadata)
        except TypeError as error:
            raise TypeError(f"edit set metadata must be plain JSON (str, numbers, lists, dicts): {error}") from error
        tensors = {name: delta.detach().to("cpu").contiguous() for name, delta in self.deltas.items()}
        with atomic_folder(folder) as tmp:
            save_file(tensors, str(tmp / DELTAS_FILE))
            scope = {}
            if self.scope is not None:
                save_file({name: keys.to("cpu").contiguous() for name, keys in self.scope.keys.items()},
                          str(tmp / SCOPE_FILE))
                scope = {"scope_threshold": self.scope.threshold, "scope_sha256": file_sha256(tmp / SCOPE_FILE)}
            record = write_metadata(tmp, {
                **self.metadata,
                "kind": KIND,
                "format": FORMAT,
                "modules": describe_modules(tensors),
                "deltas_sha256": file_sha256(tmp / DELTAS_FILE),
                **scope,
            })
        return record

    def apply(self, model: nn.Module) -> AppliedEdit:
        """Add the deltas to `model`'s weights in place (a scoped set: hook them onto the modules); the returned
        handle reverts them (also as a context manager).

        Everything is validated before any weight changes, so a refused apply leaves the model untouched.
        """
        modules = {name: _weight_module(model, name, delta) for name, delta in self.deltas.items()}
        for name, module in modules.items():
            if any(handle.edit_set is self for handle in _APPLIED.get(module, [])):
                raise RuntimeError(
                    f"this edit set is already applied to {name!r} and not reverted; revert its handle first "
                    f"(to apply it twice on purpose, compose it with itself)"
                )
        originals: dict[str, torch.Tensor] = {}
        hooks = self.scope.attach(modules, self.deltas) if self.scope is not None else []
        with torch.no_grad():
            for name, module in modules.items() if self.scope is None else ():
                weight = module.weight
                originals[name] = weight.detach().clone()
                compute = torch.promote_types(torch.promote_types(weight.dtype, self.deltas[name].dtype), torch.float32)
                # One rounding from a float32 (or wider) sum, rather than rounding the delta to bf16 first.
                weight.copy_(weight.to(compute) + self.deltas[name].to(device=weight.device, dtype=compute))
        handle = AppliedEdit(edit_set=self, modules=modules, originals=originals, hooks=hooks)
        for module in modules.values():
            _APPLIED.setdefault(module, []).append(handle)
        return handle


# Per weight-bearing module, the handles applied to it in order. Keyed by the module object itself, so the same
# Linear reached from a wrapper (a PeftModel, `model.model`) is recognised; weak, so a dropped model is forgotten.
_APPLIED: weakref.WeakKeyDictionary[nn.Module, list[AppliedEdit]] = weakref.WeakKeyDictionary()


@dataclass(eq=False)
class AppliedEdit:
    """An applied edit set: holds the original weights so `revert` restores them exactly.

    Several edit sets may be stacked on one module; they must be reverted in reverse order (last applied first),
    because each handle's originals include the edits applied before it.
    """

    edit_set: EditSet
    modules: dict[str, nn.Module]
    originals: dict[str, torch.Tensor]
    hooks: list[RemovableHandle] = field(default_factory=list)  # a scoped set's forward hooks
    active: bool = True

    def revert(self) -> None:
        """Restore the weights this handle changed, bit for bit."""
        if not self.active:
            raise RuntimeError("this edit set was already reverted; reverting twice would undo someone else's state")
        for name, module in self.modules.items():
            stack = _APPLIED.get(module)
            if not stack or stack[-1] is not self:
                raise RuntimeError(
                    f"another edit set was applied to {name!r} after this one; revert it first (last applied, "
                    f"first reverted), otherwise its change would be silently erased"
                )
        for hook in self.hooks:
            hook.remove()
        with torch.no_grad():
            for name, module in self.modules.items():
                if name in self.originals:
                    module.weight.copy_(self.originals[name])
                _APPLIED[module].pop()
        self.originals, self.hooks = {}, []
        self.active = False

    def __enter__(self) -> AppliedEdit:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.active:
            self.revert()


def _weight_module(model: nn.Module, name: str, delta: torch.Tensor) -> nn.Module:
    """The module `name` of `model`, checked to have a `weight` shaped like `delta`."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"edit set names module {name!r}, which {type(model).__name__} does not have; "
            f"was it made for another model architecture?"
        ) from None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"module {name!r} ({type(module).__name__}) has no weight tensor to edit")
    if weight.shape != delta.shape:
        raise ValueError(
            f"delta for {name!r} has shape {tuple(delta.shape)} but the module's weight has shape "
            f"{tuple(weight.shape)}; the edit set was made for another model size"
        )
    return module


def describe_modules(deltas: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Module name -> shape and dtype, as recorded in metadata (lets a reader check compatibility without loading)."""
    return {name: {"shape": list(delta.shape), "dtype": str(delta.dtype).removeprefix("torch.")}
            for name, delta in sorted(deltas.items())}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load(folder: str | Path, expected: Mapping[str, Any] | None = None) -> EditSet:
    """Read an edit set saved by `EditSet.save`, refusing corrupt files and sets made for something else.

    `expected` (e.g. `{"base_model_fingerprint": ...}`) must agree with the recorded metadata on every key given,
    else `ArtifactMismatchError`: applying deltas computed for other weights would silently damage the model.
    """
    folder = Path(folder)
    metadata = read_metadata(folder)
    if metadata is None:
        raise FileNotFoundError(f"{folder} is not a saved edit set (no metadata.json)")
    if metadata.get("kind") != KIND:
        raise ArtifactMismatchError(f"{folder} holds a {metadata.get('kind')!r} artifact, not an {KIND!r}")
    if expected:
        check_metadata(folder, expected, kind="edit set")
    deltas_path = folder / DELTAS_FILE
    if not deltas_path.is_file():
        raise CorruptArtifactError(f"edit set at {folder} lacks {DELTAS_FILE}")
    if file_sha256(deltas_path) != metadata.get("deltas_sha256"):
        raise CorruptArtifactError(
            f"{deltas_path} does not match the sha256 recorded in metadata.json (corrupted or partially copied); "
            f"re-copy or recompute the edit set"
        )
    deltas = load_file(str(deltas_path))
    if describe_modules(deltas) != metadata.get("modules"):
        raise CorruptArtifactError(f"{deltas_path} holds other modules, shapes or dtypes than metadata.json lists")
    scope = None
    if "scope_threshold" in metadata:
        scope_path = folder / SCOPE_FILE
        if not scope_path.is_file() or file_sha256(scope_path) != metadata.get("scope_sha256"):
            raise CorruptArtifactError(f"{scope_path} is missing or does not match the sha256 in metadata.json")
        scope = EditScope(load_file(str(scope_path)), float(metadata["scope_threshold"]))
    return EditSet(deltas=deltas, metadata={k: v for k, v in metadata.items() if k not in RESERVED_KEYS},
                   scope=scope)


def compose(*edit_sets: EditSet) -> EditSet:
    """One edit set whose deltas are the module-wise sums (union of modules) of `edit_sets`.

    Serving one fused delta is cheaper than stacking; equal, up to float rounding, to applying them in turn.
    Sets made for different base model fingerprints are refused: their sum is meaningful for neither model.
    """
    if not edit_sets:
        raise ValueError("compose needs at least one edit set")
    for edit_set in edit_sets:
        check_unscoped(edit_set.scope, "compose edit sets by adding their deltas")
    fingerprints = {edit_set.fingerprint for edit_set in edit_sets}
    if len(fingerprints) > 1:
        raise ArtifactMismatchError(
            f"cannot compose edit sets made for different base models (fingerprints {sorted(map(str, fingerprints))})"
        )
    deltas: dict[str, torch.Tensor] = {}
    for edit_set in edit_sets:
        for name, delta in edit_set.deltas.items():
            if name in deltas and deltas[name].shape != delta.shape:
                raise ValueError(f"cannot compose deltas for {name!r} of shapes {tuple(deltas[name].shape)} "
                                 f"and {tuple(delta.shape)}")
            deltas[name] = deltas[name] + delta.to(deltas[name].device) if name in deltas else delta.clone()
    metadata = {
        FINGERPRINT_KEY: fingerprints.pop(),
        "editor": "compose",
        "components": [dict(edit_set.metadata) for edit_set in edit_sets],
    }
    return EditSet(deltas=deltas, metadata=metadata)


def to_lora(edit_set: EditSet, rank: int) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """Per module, float32 factors (A [rank, in], B [out, rank]) with delta ≈ B @ A, from a truncated SVD.

    The singular values are split as their square root on each side (B = U_r·√S_r, A = √S_r·V_rᵀ) so A and B have
    comparable magnitudes, which keeps float16/bfloat16 adapter weights away from overflow and underflow.
    When `rank` exceeds a module's smaller dimension the factors are zero-padded to `rank`, because peft needs one
    rank for every module. The report (plain JSON) gives, per module and overall, `relative_error`
    ‖Δ − BA‖_F / ‖Δ‖_F and `kept_energy` Σ_{i≤r} s_i² / Σ s_i², so a caller can pick the rank and see its cost.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    check_unscoped(edit_set.scope, "export the edit set as LoRA factors")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    modules: dict[str, dict[str, float]] = {}
    error_sq = total_sq = kept_sq = 0.0
    for name, delta in sorted(edit_set.deltas.items()):
        if delta.dim() != 2:
            raise ValueError(f"LoRA needs 2-D deltas; {name!r} has shape {tuple(delta.shape)}")
        a, b, stats = _factorise(delta.detach().float(), rank)
        factors[name] = (a, b)
        modules[name] = {key: stats[key] for key in ("relative_error", "kept_energy")}
        error_sq += stats["error_sq"]
        total_sq += stats["total_sq"]
        kept_sq += stats["kept_sq"]
    report = {
        "rank": rank,
        "relative_error": math.sqrt(error_sq / total_sq) if total_sq > 0 else 0.0,
        "kept_energy": kept_sq / total_sq if total_sq > 0 else 1.0,
        "modules": modules,
    }
    return factors, report


def _factorise(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Rank-`rank` factors of a float32 matrix and its reconstruction statistics (see `to_lora`)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    kept = min(rank, s.numel())
    root = s[:kept].sqrt()
    a = delta.new_zeros(rank, delta.shape[1])
    b = delta.new_zeros(delta.shape[0], rank)
    a[:kept] = root[:, None] * vh[:kept]
    b[:, :kept] = u[:, :kept] * root
    total_sq = float(s.square().sum())
    kept_sq = float(s[:kept].square().sum())
    error_sq = float(torch.linalg.matrix_norm(delta - b @ a).square())
    stats = {
        "relative_error": math.sqrt(error_sq / total_sq) if total_sq > 0 else 0.0,
        "kept_energy": kept_sq / total_sq if total_sq > 0 else 1.0,
        "error_sq": error_sq,
        "total_sq": total_sq,
        "kept_sq": kept_sq,
    }
    return a, b, stats


def save_as_peft_adapter(
    edit_set: EditSet,
    rank: int,
    folder: str | Path,
    base_model_name_or_path: str,
    task_type: str | None = "CAUSAL_LM",
) -> dict[str, Any]:
    """Write the rank-`rank` LoRA approximation of `edit_set` as a peft adapter folder; returns the `to_lora` report.

    The folder is what `peft.PeftModel.from_pretrained(model, folder)` and vLLM's multi-LoRA serving load:
    `adapter_config.json` with lora_alpha = r (scaling 1, so B @ A is added as is), no dropout, no bias, and
    `target_modules` listing the full module names, so peft wraps exactly those modules and no namesakes in
    other layers; `adapter_model.safetensors` with peft's keys `base_model.model.<module>.lora_{A,B}.weight`.
    A `metadata.json` records the source edit set's metadata and the report, as for every trustray artifact.
    """
    from peft import LoraConfig

    factors, report = to_lora(edit_set, rank)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(factors),
        lora_dropout=0.0,
        bias="none",
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
    )
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.cpu().contiguous()
    with atomic_folder(folder) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / ADAPTER_FILE))
        write_metadata(tmp, {"kind": ADAPTER_KIND, "rank": rank, "edit_set": edit_set.metadata, "report": report})
    return report
