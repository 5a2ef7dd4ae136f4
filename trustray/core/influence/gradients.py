"""Per-example LoRA gradients from one batched forward and backward pass (the LESS gradient features).

For a Linear layer y = W x, the gradient of a loss with respect to W is `sum_t g_t x_tᵀ` where x_t is the
layer's input at position t and g_t the gradient of the loss with respect to its output. Capturing x (forward
hook) and g (backward hook) for every LoRA `lora_A`/`lora_B` Linear gives every example's weight gradient
with one einsum per module, at roughly the cost of a training step instead of a batch-size-1 loop.

The captured factors are what actually enters and leaves each Linear, so LoRA's dropout (before `lora_A`) and
scaling (after `lora_B`) are accounted for exactly as autograd accounts for them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from trustray.core.lm.losses import model_inputs, per_example_loss


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The `lora_A`/`lora_B` Linear layers of the active adapter, in module registration order.

    Registration order is fixed by the architecture, so every process building the same model gets the same
    list; it is also the order of `model.parameters()`, which `flatten_optimizer_state` relies on.
    """
    modules: list[tuple[str, nn.Linear]] = []
    for name, module in model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
            continue
        for adapter in getattr(module, "active_adapters", []):
            if adapter not in lora_a:
                continue
            for suffix, layer in (("lora_A", lora_a[adapter]), ("lora_B", lora_b[adapter])):
                if not isinstance(layer, nn.Linear):
                    raise TypeError(f"{name}.{suffix}.{adapter} is {type(layer).__name__}; only Linear LoRA is supported")
                if layer.bias is not None and layer.bias.requires_grad:
                    raise ValueError(f"{name}.{suffix}.{adapter} has a trainable bias; only weight gradients are supported")
                modules.append((f"{name}.{suffix}.{adapter}", layer))
    if not modules:
        raise ValueError("the model has no active LoRA adapter (expected a peft model with lora_A/lora_B layers)")
    return modules


@dataclass
class GradientBatch:
    """Captured per-example factors of a batch's LoRA weight gradients.

    `factors[name] = (inputs [B, T, in], output_grads [B, T, out])`, float32, both zero at padded positions
    (so those contribute nothing; prompt positions do contribute, through attention to later loss tokens). `loss` holds each example's mean loss over its loss
    tokens; `mask` is the attention mask as float32 `[B, T]` (None: every position is real).
    """

    factors: dict[str, tuple[Tensor, Tensor]]
    loss: Tensor
    mask: Tensor | None = None
    _dim: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._dim = sum(g.shape[-1] * x.shape[-1] for x, g in self.factors.values())

    @property
    def dim(self) -> int:
        """Size D of one example's flattened LoRA gradient."""
        return self._dim

    @property
    def batch_size(self) -> int:
        return int(self.loss.shape[0])

    def flat(self) -> Tensor:
        """Per-example weight gradients `[B, D]`, modules concatenated in `lora_modules` order."""
        parts = [torch.einsum("bto,bti->boi", g, x).flatten(1) for x, g in self.factors.values()]
        return torch.cat(parts, dim=1)

    def to(self, device: torch.device | str) -> GradientBatch:
        """The same batch with every tensor on `device` (e.g. the CPU, to keep factors off a GPU)."""
        return GradientBatch(
            factors={name: (x.to(device), g.to(device)) for name, (x, g) in self.factors.items()},
            loss=self.loss.to(device),
            mask=None if self.mask is None else self.mask.to(device),
        )


def _trainable_lora_params(modules: list[tuple[str, nn.Linear]]) -> list[Tensor]:
    params = [layer.weight for _, layer in modules]
    if not all(p.requires_grad for p in params):
        raise ValueError("every LoRA weight must require grad (is the adapter frozen or merged?)")
    return params


def per_example_gradients(model: nn.Module, batch: dict[str, Tensor]) -> GradientBatch:
    """Per-example LoRA gradients of each example's mean loss, from one batched forward and backward.

    `batch` holds `input_ids`, `attention_mask` and `labels` (-100 = no loss: padding and prompt tokens). The
    backward pass runs on the sum over examples of per-example mean losses, so example i's factors give the
    gradient of its own mean loss. Parameter `.grad`s are left exactly as they were (the backward pass uses
    `torch.autograd.grad`), and the hooks are removed even if the pass fails.
    """
    modules = lora_modules(model)
    params = _trainable_lora_params(modules)
    mask = batch["attention_mask"]
    inputs: dict[str, Tensor] = {}
    output_grads: dict[str, Tensor] = {}
    keep = mask.to(torch.bool).unsqueeze(-1)

    def forward_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Tensor, ...], _output: Tensor) -> None:
            # torch.where, not a product: garbage (even NaN) at padded positions must not leak into sums.
            inputs[name] = torch.where(keep, args[0].detach().float(), 0.0)
        return hook

    def backward_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _grad_input: tuple, grad_output: tuple[Tensor, ...]) -> None:
            output_grads[name] = torch.where(keep, grad_output[0].detach().float(), 0.0)
        return hook

    handles = []
    try:
        for name, layer in modules:
            handles.append(layer.register_forward_hook(forward_hook(name)))
            handles.append(layer.register_full_backward_hook(backward_hook(name)))
        logits = model(**model_inputs(batch)).logits
        losses = per_example_loss(logits, batch["labels"])
        with warnings.catch_warnings():
            # The first layer's input needs no gradient; the hook still gets the output gradient we want.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            torch.autograd.grad(losses.sum(), params)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, _ in modules if name not in inputs or name not in output_grads]
    if missing:
        raise RuntimeError(f"LoRA layers were not run or got no gradient (merged or disabled adapter?): {missing[:3]}")
    factors = {name: (inputs[name], output_grads[name]) for name, _ in modules}
    return GradientBatch(factors=factors, loss=losses.detach().float(), mask=mask.float())


def _first_to_last_attended(mask: Tensor) -> slice:
    positions = mask.nonzero().flatten()
    return slice(0, int(positions.max()) + 1) if len(positions) else slice(0, mask.shape[0])


def per_example_gradients_loop(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Reference: one forward and backward per example (trailing padding trimmed), reading autograd's `.grad`.

    Returns `[B, D]` in `lora_modules` order. Existing `.grad`s of the LoRA weights are restored afterwards.
    """
    modules = lora_modules(model)
    params = _trainable_lora_params(modules)
    saved = [p.grad for p in params]
    rows = []
    try:
        for i in range(batch["input_ids"].shape[0]):
            keep = _first_to_last_attended(batch["attention_mask"][i])
            for p in params:
                p.grad = None
            logits = model(
                input_ids=batch["input_ids"][i : i + 1, keep], attention_mask=batch["attention_mask"][i : i + 1, keep]
            ).logits
            per_example_loss(logits, batch["labels"][i : i + 1, keep]).sum().backward()
            rows.append(torch.cat([p.grad.detach().float().flatten() for p in params]))
    finally:
        for p, grad in zip(params, saved, strict=True):
            p.grad = grad
    return torch.stack(rows)


def adam_preconditioned(
    flat: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Tensor:
    """The update direction Adam would take from gradient(s) `flat` `[B, D]` (or `[D]`) given its moment state.

    m' = β1 m + (1-β1) g, v' = β2 v + (1-β2) g², bias-corrected with step t = `step` + 1 (the step this gradient
    would be), returning m̂ / (√v̂ + eps): exactly what torch's Adam/AdamW multiplies by lr (weight decay aside).
    LESS's reference code omits the bias correction and puts eps inside the root; with a warm optimizer the
    corrections are close to 1.
    """
    beta1, beta2 = betas
    g = flat.float()
    m = beta1 * exp_avg.float() + (1 - beta1) * g
    v = beta2 * exp_avg_sq.float() + (1 - beta2) * g.square()
    t = step + 1
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    return m_hat / (v_hat.sqrt() + eps)


def flatten_optimizer_state(model: nn.Module, optimizer_state_dict: dict) -> tuple[Tensor, Tensor, int]:
    """Map a torch Adam/AdamW `state_dict()` to flat `(exp_avg [D], exp_avg_sq [D], step)` in `lora_modules` order.

    Assumes the optimizer was built over `[p for p in model.parameters() if p.requires_grad]` (in that order,
    across its param groups), which is how state-dict indices are matched to parameters. A parameter without
    state (no step taken yet) contributes zeros.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    indices = [i for group in optimizer_state_dict["param_groups"] for i in group["params"]]
    if len(indices) != len(trainable):
        raise ValueError(
            f"optimizer holds {len(indices)} parameters but the model has {len(trainable)} trainable ones; "
            "build the optimizer over [p for p in model.parameters() if p.requires_grad]"
        )
    position = {id(p): i for i, p in enumerate(trainable)}
    state = optimizer_state_dict["state"]
    avgs, avg_sqs, steps = [], [], set()
    for name, layer in lora_modules(model):
        entry = state.get(indices[position[id(layer.weight)]])
        if entry is None:
            avgs.append(torch.zeros(layer.weight.numel()))
            avg_sqs.append(torch.zeros(layer.weight.numel()))
            steps.add(0)
            continue
        if entry["exp_avg"].shape != layer.weight.shape:
            raise ValueError(f"optimizer state for {name} has shape {tuple(entry['exp_avg'].shape)}, "
                             f"expected {tuple(layer.weight.shape)}")
        avgs.append(entry["exp_avg"].detach().float().flatten().cpu())
        avg_sqs.append(entry["exp_avg_sq"].detach().float().flatten().cpu())
        steps.add(int(entry["step"]))
    if len(steps) != 1:
        raise ValueError(f"LoRA parameters are at different optimizer steps: {sorted(steps)}")
    return torch.cat(avgs), torch.cat(avg_sqs), steps.pop()
