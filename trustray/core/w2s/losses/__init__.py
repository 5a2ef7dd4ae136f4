"""Weak-to-strong training losses: how a student learns from a supervisor's soft labels.

Each loss lives in its own module and registers itself with `@register("name")`; adding one is one file and one
line in `_MODULES`. A loss is built from its settings (`build_loss(name, **settings)`) and called as
`loss(logits [n, C], targets [n, C], step_fraction)`: `targets` are the supervisor's class probabilities (rows sum to
1; one-hot for ground truth), `step_fraction` the share of training done before this step (0 at the first step), which
losses that change over training read. All three of openai/weak-to-strong's losses are here: `xent`, `logconf` and
`product`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

from torch import Tensor


class Loss(Protocol):
    def __call__(self, logits: Tensor, targets: Tensor, step_fraction: float) -> Tensor: ...


LOSSES: dict[str, Callable[..., Loss]] = {}
_MODULES = ("xent", "logconf", "product")


def register(name: str) -> Callable[[Callable[..., Loss]], Callable[..., Loss]]:
    def add(factory: Callable[..., Loss]) -> Callable[..., Loss]:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        LOSSES[name] = factory
        return factory

    return add


def loss_names() -> list[str]:
    for module in _MODULES:  # each registers itself on first import; later imports are cached no-ops
        importlib.import_module(f"{__name__}.{module}")
    return sorted(LOSSES)


def build_loss(name: str, **settings: Any) -> Loss:
    """The loss `name` with its settings (e.g. `aux_coef` for `logconf`)."""
    if name not in loss_names():
        raise ValueError(f"unknown weak-to-strong loss {name!r}; available: {', '.join(loss_names())}")
    try:
        return LOSSES[name](**settings)
    except TypeError as error:  # an unknown setting name
        raise ValueError(f"loss {name!r} does not take settings {sorted(settings)}: {error}") from error


def check_inputs(logits: Tensor, targets: Tensor, step_fraction: float) -> None:
    if logits.dim() != 2 or logits.shape != targets.shape or logits.shape[1] < 2:
        raise ValueError(f"logits and targets must be matching [n, classes >= 2] tensors; got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    if not 0.0 <= step_fraction <= 1.0:
        raise ValueError(f"step_fraction must be in [0, 1], got {step_fraction}")
