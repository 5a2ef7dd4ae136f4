"""MEND (Mitchell et al., ICLR 2022): a meta-learned transform of the rank-1 gradient factors, edits summed.

For an edited Linear y_t = W u_t the gradient of the edit loss is ∇_W L = Σ_t δ_t u_tᵀ with δ_t = ∂L/∂y_t. MEND
does not use it as is: an editor network g maps each token's pair to a pseudo-pair (ũ_t, δ̃_t) = g(u_t, δ_t)
and the edit is

    ΔW_ℓ = −α_ℓ · Σ_t δ̃_t ũ_tᵀ,

summed over every edited token of every record in the batch (`mean_grads` in the reference code is a sum).
That plain sum is why MEND degrades when many facts are edited at once: ΔW_ℓ u_k for fact k picks up the
cross terms Σ_{t∉k} δ̃_t (ũ_tᵀ u_k) of every other fact, which grow with the number of facts (activations of
different prompts are strongly correlated) and partly cancel or overwrite fact k's own term, while α_ℓ was tuned
for the few edits per step seen in training. MALMEN (`trustray.core.editing.malmen`) replaces the sum by a
least-squares solve; MEND is kept as the baseline that shows the effect.

Sign: the paper's W̃ = W − α∇̃ is what is implemented here. The reference code adds the update (`p + lr·g`);
the author confirmed this as a bug (eric-mitchell/mend issue #13) that training compensates by flipping the
sign through the network and the learned α. With the minus sign an untrained editor (identity network) takes a
step along the negative normalised gradient, so the edit loss goes down from step 0.

Editor network, as in the reference (`GradientTransform` with `combine: True`, `IDMLP`, `LRLinear`):
- the pair is normalised per feature, (x − μ) / (σ + 1e-7), with running Welford statistics that are updated
  only in training mode (`meta_step`, `update_normalisers`); rows whose u or δ is all zero are dropped;
- one MLP on cat(u, δ) of `n_hidden + 1` residual low-rank layers, x ↦ x + relu((U V x + b) ⊙ s_ℓ + o_ℓ) with
  U = 0 at init (the network is the identity), V ~ N(0, 1), and per-module scale s_ℓ (init 1) / shift o_ℓ
  (init 0) embeddings applied before the ReLU; its output is split back into (ũ, δ̃);
- one network per weight shape, shared by the modules of that shape (the embeddings tell them apart);
- one learned step size α_ℓ per edited module (init `edit_lr_init`), trained by its own Adam (`lr_lr`).

Which tokens: the pairs are taken at the positions whose outputs predict an answer token of the
(prompt, target_new) conversation (`tracing.edit_positions`), the "ans" option of MALMEN's code, rather than
every token (MEND's reference). The edit loss is the sum over records of each record's mean answer NLL, so a
record's pairs do not depend on which other records share its batch: the delta of several records is exactly
the sum of their single-record deltas (for fixed normaliser statistics).

Meta-training (`meta_step`, the reference `EditTrainer.edit_step`): the deltas are computed with their graph
to the editor, the edited model is run functionally (`torch.func.functional_call` with W + ΔW, W detached), and

    L = edit_coef · NLL(paraphrase → target_new) + loc_coef · KL(p_pre ‖ p_post on locality probes)

is back-propagated to the editor network and the α_ℓ. The edited model's loss gradient is first taken with
respect to ΔW as a detached leaf, then pushed through the editor in one `ΔW.backward(grad)` (the same
decoupling MALMEN uses), so the language model's graph of one mini-batch is alive at a time. The base model's
weights, flags and `.grad` are never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from trustray.core.editing.base import (
    Editor,
    EditorSettings,
    EditRecord,
    ProgressLog,
    batches,
)
from trustray.core.editing.finetune import (
    answer_kl,
    edit_examples,
    edited_weights,
    forward_logits,
    locality_examples,
    paraphrase_examples,
    row_nll,
)
from trustray.core.editing.metrics import agreement, token_accuracy
from trustray.core.editing.normalize import RunningStats
from trustray.core.editing.registry import register
from trustray.core.editing.tracing import KeyValueTracer, edit_positions, linear_modules
from trustray.core.lm.losses import model_inputs

LOG = logging.getLogger(__name__)

NORM_EPS = 1e-7
"""Added to the standard deviation when normalising (the reference's value)."""


class MendSettings(EditorSettings):
    """MEND's editor network and meta-training hyper-parameters (defaults from the reference unless noted)."""

    rank: int = Field(1920, ge=1, description="Rank of each low-rank layer of the editor MLP (capped at its width).")
    n_hidden: int = Field(1, ge=0, description="Hidden layers of the editor MLP: it has n_hidden + 1 residual layers.")
    edit_lr_init: float = Field(1e-4, description="Initial step size α_ℓ of every edited module (learned).")
    meta_lr: float = Field(
        1e-5, gt=0,
        description="Adam learning rate of the editor network. MEND's configs use 1e-6 for ~100k single-edit steps; "
        "1e-5 is MALMEN's value for its MEND baseline, trained for hundreds of steps as here (useful range 1e-6..1e-4).",
    )
    lr_lr: float = Field(1e-4, ge=0, description="Adam learning rate of the step sizes α_ℓ (0 freezes them).")
    edit_coef: float = Field(0.1, ge=0, description="Weight of the paraphrase NLL of the edited model in the meta loss.")
    loc_coef: float = Field(1.0, ge=0, description="Weight of the locality KL(p_pre ‖ p_post) in the meta loss.")
    max_grad_norm: float = Field(
        100.0, gt=0, description="Clip of the meta-gradient's global norm over the network and the α_ℓ (MEND: 100)."
    )
    paraphrases_per_record: int = Field(
        1, ge=1, description="Paraphrases per record in each meta step, taken cyclically by step (MEND uses one)."
    )
    locality_per_record: int = Field(
        1, ge=1, description="Locality probes per record in each meta step, taken cyclically by step."
    )
    seed: int = Field(0, description="Seed of the editor network's random initialisation (V ~ N(0, 1)).")


class WelfordNormaliser(RunningStats):
    """`forward(x)` returns (x − μ) / (σ + 1e-7) with the running unbiased σ; `forward(x, fallback=True)` uses
    x's own statistics until two rows have been merged."""

    def forward(self, x: Tensor, fallback: bool = False) -> Tensor:
        if float(self.count) >= 2:
            mean, std = self.stats()
        elif fallback and x.shape[0] >= 2:
            mean, std = x.detach().double().mean(dim=0), x.detach().double().std(dim=0)
        else:
            raise RuntimeError(
                f"MEND normaliser has seen {int(self.count)} rows and the input has {x.shape[0]}: at least 2 are "
                "needed (run a meta step or `update_normalisers` first)"
            )
        return (x - mean.to(x.dtype)) / (std.to(x.dtype) + NORM_EPS)


class LRLinear(nn.Module):
    """x ↦ x + relu((U V x + b) ⊙ scale[mode] + shift[mode]); U = 0 at init, so the layer starts as the identity."""

    def __init__(self, dim: int, rank: int, n_modes: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        mid = min(rank, dim)
        self.u = nn.Parameter(torch.zeros(dim, mid))
        self.v = nn.Parameter(torch.randn(mid, dim, generator=generator))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Embedding(n_modes, dim)
        self.mode_shift = nn.Embedding(n_modes, dim)
        nn.init.ones_(self.mode_scale.weight)
        nn.init.zeros_(self.mode_shift.weight)

    def forward(self, x: Tensor, mode: int) -> Tensor:
        index = torch.tensor(mode, device=x.device)
        pre = (x @ self.v.T) @ self.u.T + self.bias
        pre = pre * self.mode_scale(index) + self.mode_shift(index)
        # clamp rather than relu: the reference's choice, so the gradient at 0 is not 0.
        return pre.clamp(min=0) + x


class MendNet(nn.Module):
    """The editor network of one weight shape: normalise cat(u, δ), residual low-rank MLP, split into (ũ, δ̃)."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, n_hidden: int, n_modes: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        dim = in_features + out_features
        self.normaliser = WelfordNormaliser(dim)
        self.layers = nn.ModuleList([LRLinear(dim, rank, n_modes, generator) for _ in range(n_hidden + 1)])

    def forward(self, u: Tensor, delta: Tensor, mode: int, update: bool = False) -> tuple[Tensor, Tensor]:
        """(ũ, δ̃) for row-aligned u [n, in] and δ [n, out]; `update` first merges the rows into the statistics."""
        x = torch.cat([u.float(), delta.float()], dim=-1)
        if update:
            self.normaliser.update(x)
        x = self.normaliser(x, fallback=True)
        for layer in self.layers:
            x = layer(x, mode)
        return x[:, : self.in_features], x[:, self.in_features :]


def _shape_key(module: nn.Linear) -> str:
    return f"{module.out_features}x{module.in_features}"


def _mean(values: Sequence[Tensor]) -> float:
    return float(torch.cat(values).mean()) if values else float("nan")


@register
class MendEditor(Editor):
    """MEND: per edited Linear, ΔW = −α_ℓ Σ_t δ̃_t ũ_tᵀ over every answer token of every record (see module doc)."""

    name = "mend"
    Settings = MendSettings
    meta_learned = True

    def __init__(self, model: nn.Module, tokenizer: Any, settings: EditorSettings | Mapping[str, Any] | None = None) -> None:
        super().__init__(model, tokenizer, settings)
        settings = self.settings
        self.modules = linear_modules(model, self.module_names)
        self.device = next(iter(self.modules.values())).weight.device
        groups: dict[str, list[str]] = {}
        for name, module in self.modules.items():
            groups.setdefault(_shape_key(module), []).append(name)
        self.net_key = {name: key for key, names in groups.items() for name in names}
        self.mode = {name: names.index(name) for names in groups.values() for name in names}
        generator = torch.Generator().manual_seed(settings.seed)
        self.nets = nn.ModuleDict({
            key: MendNet(
                self.modules[names[0]].in_features, self.modules[names[0]].out_features,
                settings.rank, settings.n_hidden, len(names), generator,
            )
            for key, names in groups.items()
        }).to(self.device)
        self.edit_lrs = nn.Parameter(torch.full((len(self.modules),), float(settings.edit_lr_init), device=self.device))
        self.lr_index = {name: index for index, name in enumerate(self.modules)}
        self.optimizer = torch.optim.Adam(self.nets.parameters(), lr=settings.meta_lr)
        self.lr_optimizer = torch.optim.Adam([self.edit_lrs], lr=settings.lr_lr)
        self.steps = 0

    # -- pairs and deltas ---------------------------------------------------------------------------------------

    def edit_pairs(self, records: Sequence[EditRecord]) -> dict[str, tuple[Tensor, Tensor]]:
        """Per edited module, row-aligned (u [n, in], δ [n, out]) float32 at the answer positions of the records.

        δ is the gradient of Σ_records (mean answer NLL of the record) with respect to the module's output. The
        model is run functionally with detached copies of the edited weights as the only leaves, so its own
        parameters and their `.grad` stay untouched. Rows whose u or δ is all zero are dropped (as in MEND).
        """
        if not records:
            raise ValueError("MEND needs at least one edit record")
        examples = edit_examples(self.tokenizer, records, self.settings.max_length)
        leaves = {name: module.weight.detach().requires_grad_() for name, module in self.modules.items()}
        params = {f"{name}.weight": leaf for name, leaf in leaves.items()}
        placeholder = torch.zeros(1, 1, dtype=torch.bool)
        # enable_grad: an inference caller may hold torch.no_grad(); the value gradients need a graph.
        with KeyValueTracer(self.modules, placeholder) as tracer, torch.enable_grad():
            for batch in batches(examples, self.settings.batch_size, self.device):
                tracer.mask = edit_positions(batch["labels"])
                logits = functional_call(self.model, params, args=(), kwargs=model_inputs(batch)).logits
                loss = row_nll(logits, batch["labels"]).sum()
                torch.autograd.grad(loss, list(leaves.values()))
        keys, grads = tracer.keys, tracer.grads
        pairs = {}
        for name in self.modules:
            u, delta = keys[name], grads[name]
            keep = (u != 0).any(dim=-1) & (delta != 0).any(dim=-1)
            pairs[name] = (u[keep], delta[keep])
        return pairs

    def update_normalisers(self, records: Sequence[EditRecord]) -> None:
        """Merge the records' (u, δ) rows into the running statistics, as a meta step does (module by module)."""
        for name, (u, delta) in self.edit_pairs(records).items():
            self.nets[self.net_key[name]].normaliser.update(torch.cat([u, delta], dim=-1))

    def deltas_from_pairs(self, pairs: Mapping[str, tuple[Tensor, Tensor]], update: bool = False) -> dict[str, Tensor]:
        """ΔW_ℓ = −α_ℓ · δ̃ᵀ ũ per module (with autograd graph to the editor when grad mode is on).

        `update` merges each module's rows into its network's normaliser first (training mode). Before the
        statistics hold 2 rows, the rows' own statistics are used without being stored.
        """
        deltas = {}
        for name, (u, delta) in pairs.items():
            net = self.nets[self.net_key[name]]
            pseudo_u, pseudo_delta = net(u, delta, self.mode[name], update=update)
            deltas[name] = -self.edit_lrs[self.lr_index[name]] * (pseudo_delta.T @ pseudo_u)
        return deltas

    def compute_deltas(self, records: Sequence[EditRecord]) -> dict[str, Tensor]:
        """Float32 deltas of all records at once, with the normaliser statistics frozen (inference).

        Streamed: with frozen statistics each row is transformed on its own and a record's rows do not depend on
        its batch, so the sum over sub-batches of `batch_size` records equals one pass over all rows, and memory
        does not grow with the number of edits. An editor whose normaliser has seen fewer than 2 rows normalises
        with the rows' own statistics, which needs all of them at once.
        """
        if not records:
            raise ValueError("MEND needs at least one edit record")
        untrained = any(float(net.normaliser.count) < 2 for net in self.nets.values())
        size = len(records) if untrained else self.settings.batch_size
        progress = ProgressLog("mend: keys, value gradients and deltas", len(records))
        total: dict[str, Tensor] = {}
        for start in range(0, len(records), size):
            part = records[start : start + size]
            pairs = self.edit_pairs(part)
            with torch.no_grad():
                for name, delta in self.deltas_from_pairs(pairs).items():
                    total[name] = total[name] + delta if name in total else delta
            progress.update(len(part))
        return total

    # -- meta-training ------------------------------------------------------------------------------------------

    def meta_step(self, records: Sequence[EditRecord], general: Sequence[str] | None = None) -> dict[str, float]:
        """One meta-training step on a batch of records; returns the losses and teacher-forced ES / GS / LS.

        `general` is MALMEN's retention text; MEND has no retention term and refuses it.

        ES: answer-token accuracy on the edit prompts after the edit; GS: the same on the paraphrases used in the
        loss; LS: agreement of the edited with the unedited model's argmax at the locality answer positions.
        `edit_loss` is the paraphrase NLL (before `edit_coef`), `loc_loss` the locality KL (before `loc_coef`).
        """
        if general:
            raise ValueError("MEND has no retention term: meta-train it without general text")
        settings = self.settings
        pairs = self.edit_pairs(records)
        deltas = self.deltas_from_pairs(pairs, update=True)
        leaves = {name: delta.detach().requires_grad_() for name, delta in deltas.items()}
        leaf_list = list(leaves.values())

        def params() -> dict[str, Tensor]:
            return edited_weights(self.modules, leaves)

        rephrase = paraphrase_examples(
            self.tokenizer, records, settings.max_length, settings.paraphrases_per_record, self.steps
        )
        locality = locality_examples(
            self.tokenizer, records, settings.max_length, settings.locality_per_record, self.steps
        )
        grads = [torch.zeros_like(leaf) for leaf in leaf_list]
        edit_loss = loc_loss = 0.0
        generalisation: list[Tensor] = []
        for batch in batches(rephrase, settings.batch_size, self.device):
            logits = forward_logits(self.model, batch, params())
            nll = row_nll(logits, batch["labels"])
            loss = settings.edit_coef * nll.sum() / len(rephrase)
            for total, grad in zip(grads, torch.autograd.grad(loss, leaf_list, allow_unused=True), strict=True):
                if grad is not None:
                    total += grad
            edit_loss += float(nll.detach().sum()) / len(rephrase)
            targets, mask = batch["labels"][:, 1:], batch["labels"][:, 1:] != -100
            generalisation.append(token_accuracy(logits.detach()[:, :-1].argmax(-1), targets, mask))

        locality_agreement: list[Tensor] = []
        if locality:
            loc_batches = batches(locality, settings.batch_size, self.device)
            n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in loc_batches)
            for batch in loc_batches:
                with torch.no_grad():
                    reference = forward_logits(self.model, batch)
                logits = forward_logits(self.model, batch, params())
                kl_sum, _ = answer_kl(reference, logits, batch["labels"])
                loss = settings.loc_coef * kl_sum / max(n_tokens, 1)
                if loss.requires_grad:
                    for total, grad in zip(grads, torch.autograd.grad(loss, leaf_list, allow_unused=True), strict=True):
                        if grad is not None:
                            total += grad
                loc_loss += float(kl_sum.detach()) / max(n_tokens, 1)
                mask = batch["labels"][:, 1:] != -100
                locality_agreement.append(agreement(
                    logits.detach()[:, :-1].argmax(-1), reference[:, :-1].argmax(-1), mask
                ))

        self.optimizer.zero_grad(set_to_none=True)
        self.lr_optimizer.zero_grad(set_to_none=True)
        outer = [*self.nets.parameters(), self.edit_lrs]
        torch.autograd.backward(list(deltas.values()), grads, inputs=outer)
        grad_norm = torch.nn.utils.clip_grad_norm_(outer, settings.max_grad_norm)
        self.optimizer.step()
        self.lr_optimizer.step()
        self.steps += 1

        with torch.no_grad():
            success = []
            frozen = edited_weights(self.modules, {name: leaf.detach() for name, leaf in leaves.items()})
            for batch in batches(edit_examples(self.tokenizer, records, settings.max_length), settings.batch_size,
                                 self.device):
                logits = forward_logits(self.model, batch, frozen)
                targets, mask = batch["labels"][:, 1:], batch["labels"][:, 1:] != -100
                success.append(token_accuracy(logits[:, :-1].argmax(-1), targets, mask))
        return {
            "loss": settings.edit_coef * edit_loss + settings.loc_coef * loc_loss,
            "edit_loss": edit_loss,
            "loc_loss": loc_loss,
            "es": _mean(success),
            "gs": _mean(generalisation),
            "ls": _mean(locality_agreement),
            "grad_norm": float(grad_norm),
            "edit_lr_mean": float(self.edit_lrs.detach().mean()),
            "delta_norm": float(sum(float(torch.linalg.matrix_norm(leaf.detach())) for leaf in leaf_list)),
        }

    # -- state ----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Tensor]:
        """Networks (with normaliser statistics), step sizes, both optimizers' states and the step count."""
        state = {f"nets.{key}": value.detach().clone() for key, value in self.nets.state_dict().items()}
        state["edit_lrs"] = self.edit_lrs.detach().clone()
        state["steps"] = torch.tensor(self.steps, dtype=torch.long)
        for prefix, optimizer in (("optimizer", self.optimizer), ("lr_optimizer", self.lr_optimizer)):
            for index, slots in optimizer.state_dict()["state"].items():
                for slot, value in slots.items():
                    tensor = value if isinstance(value, Tensor) else torch.tensor(value)
                    state[f"{prefix}.{index}.{slot}"] = tensor.detach().clone()
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore what `state_dict` saved (for resuming meta-training or serving); mismatches are errors."""
        nets = {key.removeprefix("nets."): value for key, value in state.items() if key.startswith("nets.")}
        optimizers: dict[str, dict[int, dict[str, Tensor]]] = {"optimizer": {}, "lr_optimizer": {}}
        unknown = []
        for key, value in state.items():
            prefix, _, rest = key.partition(".")
            if prefix in optimizers:
                index, _, slot = rest.partition(".")
                if not index.isdigit() or not slot:
                    unknown.append(key)
                    continue
                optimizers[prefix].setdefault(int(index), {})[slot] = value
            elif key not in ("edit_lrs", "steps") and not key.startswith("nets."):
                unknown.append(key)
        if unknown:
            raise ValueError(f"unexpected keys in MEND state: {sorted(unknown)[:5]}")
        if "edit_lrs" not in state:
            raise ValueError("MEND state lacks 'edit_lrs'")
        if state["edit_lrs"].shape != self.edit_lrs.shape:
            raise ValueError(
                f"MEND state has {state['edit_lrs'].numel()} step sizes but this editor edits {self.edit_lrs.numel()} modules"
            )
        try:
            self.nets.load_state_dict(nets, strict=True)
        except RuntimeError as error:
            raise ValueError(f"MEND state does not fit this editor's networks: {error}") from error
        with torch.no_grad():
            self.edit_lrs.copy_(state["edit_lrs"].to(self.edit_lrs.device))
        self.steps = int(state.get("steps", torch.tensor(0)))
        for prefix, optimizer in (("optimizer", self.optimizer), ("lr_optimizer", self.lr_optimizer)):
            current = optimizer.state_dict()
            optimizer.load_state_dict({"state": optimizers[prefix], "param_groups": current["param_groups"]})
