"""Edit scopes: a weight change that acts only where its edits' keys are.

A key-value editor (MEMIT) writes each fact at one key: the edited Linear's input at the subject's last token.
Its closed form ΔW moves every input, though, and the small moves add up: on the embedded default 16 MEMIT
edits in one request change the greedy answers to many unrelated questions (`memit_unscoped` in
`benchmarks/results/served_edit_locality.json`). A scope keeps the change where it
was written. At each token position the edited module adds ΔW·x only when x's cosine with one of the edit keys
is at least `threshold`, and returns the unedited output everywhere else. This is GRACE's deferral radius
(Hartvigsen et al. 2023, "Aging with GRACE"), with MEMIT's ΔW as the value the codebook holds.

A paraphrase names the same subject, and the subject's last token gives nearly the same key in any wording, so
the edit still generalises; an unrelated prompt has no position near a key and is answered exactly as before.
What a scope cannot do is what a plain weight change can: be folded into the weights, exported as a LoRA
adapter, or composed with another set by addition. Those paths refuse a scoped set with a message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


@dataclass(eq=False)
class EditScope:
    """Per module name, the edit keys ([n, in_features], unit rows) and the cosine from which a key is in scope."""

    keys: dict[str, Tensor]
    threshold: float

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"a scope threshold is a cosine in [-1, 1]; got {self.threshold}")
        for name, keys in self.keys.items():
            if keys.dim() != 2 or keys.shape[0] == 0:
                raise ValueError(f"scope keys for {name!r} must be a non-empty [n, in_features] matrix; "
                                 f"got shape {tuple(keys.shape)}")
        self.keys = {name: nn.functional.normalize(keys.detach().float(), dim=1) for name, keys in self.keys.items()}

    def in_scope(self, name: str, inputs: Tensor) -> Tensor:
        """Which positions of `inputs` ([..., in_features]) are within the scope of module `name`'s edits."""
        keys = self.keys[name].to(inputs.device)
        similarity = nn.functional.normalize(inputs.float(), dim=-1) @ keys.T
        return similarity.amax(dim=-1) >= self.threshold

    def output_hook(self, name: str, delta: Tensor) -> Callable[[nn.Module, tuple[Any, ...], Tensor], Tensor]:
        """A forward hook for module `name` that adds `delta` @ x at the positions in scope only."""

        def add_in_scope(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            inputs = args[0]
            rows = self.in_scope(name, inputs).reshape(-1)
            if not bool(rows.any()):
                return output
            change = inputs.reshape(-1, inputs.shape[-1])[rows] @ delta.to(inputs.device, inputs.dtype).T
            edited = output.reshape(-1, output.shape[-1]).clone()
            edited[rows] += change.to(edited.dtype)
            return edited.reshape(output.shape)

        return add_in_scope

    def check_covers(self, names: Iterable[str]) -> None:
        """Refuse edited modules the scope has no keys for."""
        missing = sorted(set(names) - set(self.keys))
        if missing:
            raise ValueError(f"the scope has no keys for the edited modules {missing}")

    def attach(self, modules: Mapping[str, nn.Module], deltas: Mapping[str, Tensor]) -> list[RemovableHandle]:
        """Hook every module of `deltas` (found in `modules` by name); remove the handles to undo it."""
        self.check_covers(deltas)
        return [modules[name].register_forward_hook(self.output_hook(name, delta)) for name, delta in deltas.items()]


def check_unscoped(scope: EditScope | None, action: str) -> None:
    """Refuse `action` (a path that needs a plain weight change) for a scoped edit set."""
    if scope is not None:
        raise ValueError(f"cannot {action}: the edit set is scoped (its change applies only at positions near its "
                         "edit keys), which a plain weight change cannot express; make the edit set with the "
                         "editor's scope_threshold set to null for a plain weight change")
