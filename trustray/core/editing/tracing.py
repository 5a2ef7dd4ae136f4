"""Cache keys (layer inputs) and value gradients (output gradients) of chosen Linear layers at chosen positions.

For y_t = W k_t the loss gradient is ∇_W L = Σ_t g_t k_tᵀ with g_t = ∂L/∂y_t: MEND and MALMEN feed the pairs
(k_t, g_t) of the tokens being edited to a hyper-network instead of using the summed gradient. `KeyValueTracer`
captures exactly those pairs during an ordinary forward and backward pass, at the positions of a boolean mask.

Label alignment (the most common silent failure in editing code). Batches here follow the transformers
convention: `labels` is aligned with `input_ids` and the model shifts internally, so `labels[:, t]` is the target
of the logits at position t − 1, and -100 means no loss. The rows to cache are the positions whose *outputs*
predict a labelled token, i.e. `labels[:, t + 1] != -100` placed at position t (`edit_positions`); the last
position predicts nothing and `labels[:, 0]` is never a target. (MALMEN's reference data instead pre-shifts labels
so that `labels[:, t]` is predicted at t; do not mix the two.)

For the topmost edited layer, positions outside that mask get no gradient from the loss, so Σ_j g_j k_jᵀ over the
cached rows equals the layer's weight gradient. For lower layers, earlier positions also receive gradient through
later attention; MALMEN deliberately caches only the predicting positions anyway (use the attention mask as the
trace mask to recover the full weight gradient, as MEND does).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def edit_positions(labels: Tensor) -> Tensor:
    """Boolean [B, T] mask of the positions whose outputs predict a labelled token (transformers alignment).

    `mask[:, t] = labels[:, t + 1] != -100` for t < T − 1 and `mask[:, T − 1] = False`; `labels[:, 0]` is ignored,
    exactly as the model's internal shift ignores it. Works for right and left padding alike.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, T], got shape {tuple(labels.shape)}")
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def linear_modules(model: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    """The named submodules of `model`, in the given order, checked to be `nn.Linear`."""
    available = dict(model.named_modules())
    modules: dict[str, nn.Linear] = {}
    for name in names:
        if name not in available:
            linear_names = [n for n, m in available.items() if isinstance(m, nn.Linear)]
            hint = ", ".join(linear_names[:6]) + (", ..." if len(linear_names) > 6 else "")
            raise KeyError(f"model has no module named {name!r} (Linear modules include: {hint})")
        module = available[name]
        if not isinstance(module, nn.Linear):
            raise TypeError(f"module {name!r} is {type(module).__name__}, not nn.Linear")
        modules[name] = module
    return modules


class KeyValueTracer:
    """Context manager caching `keys[name]` (inputs, [n, in]) and `grads[name]` (output gradients, [n, out]).

    Rows are the positions where `mask` is True, in row-major (batch, position) order, detached and float32 on
    the model's device. Several forward/backward passes may run inside one context (MALMEN caches in LM
    sub-batches): set `tracer.mask` for each sub-batch before its forward; rows are appended and concatenated on
    read. Each forward pass's gradients are matched to its own keys whatever the order of the backward passes, and
    a second backward through the same graph (retain_graph) adds to them, as it adds to `weight.grad`.

    The gradient is taken with a tensor hook on the module output (registered in the forward hook), so it does
    not depend on the module input requiring grad; the output must require grad, though (some parameter at or
    below the module must), and traced forwards must not run under `torch.no_grad()` — both raise rather than
    silently cache keys without gradients. Not for gradient checkpointing (the recomputed forward would be traced
    twice). Every hook is removed on exit, also when the block raises.
    """

    def __init__(self, modules: Mapping[str, nn.Linear], mask: Tensor) -> None:
        self.modules = dict(modules)
        self.mask = mask
        self._keys: dict[str, list[Tensor]] = {name: [] for name in self.modules}
        self._grads: dict[str, list[Tensor | None]] = {name: [] for name in self.modules}
        self._handles: list[RemovableHandle] = []
        self._active = False

    @property
    def mask(self) -> Tensor:
        """Boolean [B, T] mask of the positions to cache for the next forward pass."""
        return self._mask

    @mask.setter
    def mask(self, mask: Tensor) -> None:
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError(f"mask must be a boolean [B, T] tensor, got {mask.dtype} {tuple(mask.shape)}")
        self._mask = mask

    def __enter__(self) -> KeyValueTracer:
        if self._active:
            raise RuntimeError("KeyValueTracer is already active")
        self._active = True
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._active = False

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not args:
                raise RuntimeError(f"{name} was called without a positional input; cannot trace its keys")
            inputs = args[0]
            if tuple(inputs.shape[:-1]) != tuple(self._mask.shape):
                raise ValueError(
                    f"trace mask {tuple(self._mask.shape)} does not match the leading dims of {name}'s input "
                    f"{tuple(inputs.shape)}; set tracer.mask for this batch"
                )
            if not output.requires_grad:
                raise RuntimeError(
                    f"output of {name} does not require grad (forward under torch.no_grad(), or no parameter at or "
                    "below it requires grad): its value gradients could not be traced"
                )
            mask = self._mask.to(inputs.device)
            self._keys[name].append(inputs[mask].detach().float())
            slot = len(self._grads[name])
            self._grads[name].append(None)
            self._handles.append(output.register_hook(self._grad_hook(name, slot, mask)))

        return hook

    def _grad_hook(self, name: str, slot: int, mask: Tensor):
        def hook(grad: Tensor) -> None:
            rows = grad[mask].detach().float()
            previous = self._grads[name][slot]
            self._grads[name][slot] = rows if previous is None else previous + rows

        return hook

    @property
    def keys(self) -> dict[str, Tensor]:
        """Cached inputs per module, [n, in_features] float32 (n = masked positions over all traced passes)."""
        return {name: self._concat(parts, self.modules[name].in_features) for name, parts in self._keys.items()}

    @property
    def grads(self) -> dict[str, Tensor]:
        """Cached output gradients per module, [n, out_features] float32, row-aligned with `keys`."""
        result = {}
        for name, parts in self._grads.items():
            missing = sum(part is None for part in parts)
            if missing:
                raise RuntimeError(f"{missing} traced forward pass(es) of {name} have had no backward pass yet")
            result[name] = self._concat(parts, self.modules[name].out_features)
        return result

    @staticmethod
    def _concat(parts: list, width: int) -> Tensor:
        return torch.cat(parts) if parts else torch.empty(0, width)


class KeyMoments:
    """Context manager adding Σ k kᵀ (float64) of each module's inputs at the masked positions into `sums[name]`.

    Forward only (no value gradients): the second moment MEMIT-style preservation needs. Set `mask` per batch.
    """

    def __init__(self, modules: Mapping[str, nn.Linear], sums: dict[str, Tensor]) -> None:
        self.modules, self.sums = modules, sums
        self.mask = torch.zeros(1, 1, dtype=torch.bool)
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> KeyMoments:
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            inputs = args[0]
            if tuple(inputs.shape[:-1]) != tuple(self.mask.shape):
                raise ValueError(f"moment mask {tuple(self.mask.shape)} does not match {name}'s input {tuple(inputs.shape)}")
            keys = inputs[self.mask.to(inputs.device)].detach().to(torch.float64)
            self.sums[name] += (keys.T @ keys).to(self.sums[name].device)

        return hook
