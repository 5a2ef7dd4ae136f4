"""Fine-tuning baselines for knowledge editing: no meta-training, gradient descent on the edited modules only.

`ft` (FT-L of Meng et al. 2022, "ROME", and Zhu et al. 2020): Adam on the weights of the edited Linear modules,
minimising the answer NLL of every record's (prompt, target_new) conversation, with each module's change kept
inside a Frobenius ball after every step. `ft_kl` adds what the meta-learned editors are trained to respect: a
locality term (KL from the unedited model on the records' locality probes) and a replay term on general text.

Both never change the model they are given. They optimise the deltas D_ℓ themselves (starting at 0, i.e. from
the current weights: Adam is translation invariant, so this is the same trajectory as Adam on W_ℓ) and run the
model functionally (`torch.func.functional_call` with W_ℓ + D_ℓ); the model's weights, `requires_grad` flags and
`.grad` fields are left exactly as they were, and the result is returned as `{module name: D_ℓ}`.

The helpers at the top (loss per row, KL at answer positions, functional forward with deltas, record pairs) are
shared with `trustray.core.editing.mend`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from trustray.core.editing.base import (
    Editor,
    EditorSettings,
    EditRecord,
    ProgressLog,
    batches,
    check_prefix_layers,
    encode_pairs,
)
from trustray.core.editing.metrics import answer_window
from trustray.core.editing.registry import register
from trustray.core.editing.tracing import linear_modules
from trustray.core.lm.batching import IGNORE_INDEX
from trustray.core.lm.losses import model_inputs
from trustray.core.lm.prefix import prefix_states, skipped_prefix, with_states

LOG = logging.getLogger(__name__)

GeneralText = Sequence[str] | Callable[[int], Sequence[str]]
"""General text for replay: a list of strings, or a callable giving the strings for optimizer step `i`."""


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers (also used by MEND)


def row_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Each row's mean NLL over its labelled tokens `[B]` (transformers alignment: logits[t] predicts labels[t+1]).

    Rows without a labelled token get 0. Computed in float32 whatever the logits' dtype.
    """
    targets = labels[:, 1:]
    losses = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view_as(targets)
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return losses.sum(dim=1) / counts.clamp(min=1)


def answer_kl(reference_logits: Tensor, logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """(Σ KL(p_ref ‖ p) over the positions predicting a label, number of such positions).

    `reference_logits` are the unedited model's (no gradient needed), `logits` the edited model's. Summing rather
    than averaging lets callers average over all positions of several mini-batches.
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    count = int(mask.sum())
    if count == 0:
        return logits.new_zeros((), dtype=torch.float32), 0
    reference = F.log_softmax(reference_logits[:, :-1][mask].float(), dim=-1)
    current = F.log_softmax(logits[:, :-1][mask].float(), dim=-1)
    return (reference.exp() * (reference - current)).sum(), count


def edited_weights(modules: Mapping[str, nn.Linear], deltas: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`{"<module>.weight": W + Δ}` for `functional_call`; W is detached, so no gradient reaches the base model.

    The sum is formed in float32 and cast back to the weight's dtype (a bf16 model stays bf16).
    """
    params = {}
    for name, delta in deltas.items():
        weight = modules[name].weight
        params[f"{name}.weight"] = (weight.detach().float() + delta.to(weight.device).float()).to(weight.dtype)
    return params


def forward_logits(model: nn.Module, batch: Mapping[str, Tensor], params: Mapping[str, Tensor] | None = None,
                   logits_to_keep: int = 0) -> Tensor:
    """The model's logits on a collated batch, with `params` substituted functionally when given.

    With `logits_to_keep` = k > 0, only the last k positions' logits (the model's own argument; 0 keeps all).
    """
    inputs = model_inputs(dict(batch))
    if logits_to_keep:
        inputs["logits_to_keep"] = logits_to_keep
    if not params:
        return model(**inputs).logits
    return functional_call(model, dict(params), args=(), kwargs=inputs).logits


def edit_examples(tokenizer: Any, records: Sequence[EditRecord], max_length: int) -> list[dict[str, list[int]]]:
    """Encoded (prompt, target_new) conversations, one per record."""
    return encode_pairs(tokenizer, [r["prompt"] for r in records], [r["target_new"] for r in records], max_length)


def paraphrase_examples(
    tokenizer: Any, records: Sequence[EditRecord], max_length: int, per_record: int | None = None, offset: int = 0
) -> list[dict[str, list[int]]]:
    """Encoded (paraphrase, target_new) conversations; a record without paraphrases contributes its prompt.

    With `per_record`, each record contributes that many paraphrases, chosen cyclically from index `offset`
    (callers pass the step number, so successive steps visit every paraphrase).
    """
    prompts, answers = [], []
    for record in records:
        options = list(record.get("paraphrases") or []) or [record["prompt"]]
        chosen = options if per_record is None else [
            options[(offset + i) % len(options)] for i in range(min(per_record, len(options)))
        ]
        prompts += chosen
        answers += [record["target_new"]] * len(chosen)
    return encode_pairs(tokenizer, prompts, answers, max_length)


def locality_examples(
    tokenizer: Any, records: Sequence[EditRecord], max_length: int, per_record: int | None = None, offset: int = 0
) -> list[dict[str, list[int]]]:
    """Encoded (locality prompt, its answer) conversations of the records (possibly none); cyclic as above."""
    prompts, answers = [], []
    for record in records:
        options = list(record.get("locality") or [])
        if not options:
            continue
        chosen = options if per_record is None else [
            options[(offset + i) % len(options)] for i in range(min(per_record, len(options)))
        ]
        prompts += [item["prompt"] for item in chosen]
        answers += [item["answer"] for item in chosen]
    return encode_pairs(tokenizer, prompts, answers, max_length) if prompts else []


def text_examples(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[dict[str, list[int]]]:
    """Plain text (no chat template) with every token after the first as a target; texts under 2 tokens dropped."""
    examples = []
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"])
        if len(ids) >= 2:
            examples.append({"input_ids": ids, "labels": list(ids)})
    return examples


def project_frobenius(delta: Tensor, bound: float) -> None:
    """In place: scale `delta` onto the Frobenius ball of radius `bound` when it lies outside (exact projection)."""
    norm = float(torch.linalg.matrix_norm(delta))
    if norm > bound:
        delta.mul_(bound / norm)


# ----------------------------------------------------------------------------------------------------------------
# FT (FT-L)


class FineTuneSettings(EditorSettings):
    """FT-L: Adam on the edited modules' weights with a per-module norm constraint."""

    steps: int = Field(
        25, ge=1,
        description="Epochs over the records (ROME's FT-L uses 25); each epoch takes one Adam step per mini-batch "
        "of `batch_size` records.",
    )
    lr: float = Field(5e-4, gt=0, description="Adam learning rate on the weight deltas (ROME's FT-L: 5e-4).")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay on the deltas (pulls them towards 0).")
    norm_bound: float | None = Field(
        0.1, gt=0,
        description="Largest Frobenius norm of each module's delta, enforced by projection after every Adam step; "
        "None disables the constraint. Relative to ‖W‖_F of the module's current weight when `norm_relative`, "
        "else absolute. (FT-L clamps each element to ±5e-4 instead; a Frobenius ball is rotation invariant and "
        "comparable across module sizes when relative.)",
    )
    norm_relative: bool = Field(True, description="`norm_bound` is a fraction of ‖W‖_F (True) or absolute (False).")
    early_stop_loss: float = Field(
        1e-2, ge=0,
        description="Stop when an epoch's mean edit NLL falls below this (as ROME's FT); 0 runs every epoch.",
    )
    prefix_layers: int = Field(
        0, ge=0,
        description="Decoder layers run once per example and bypassed in every Adam step (≤ the lowest edited "
        "layer; the result is the same as with the full model, each step costs only the layers above).",
    )


@register
class FineTuneEditor(Editor):
    """Constrained fine-tuning of the edited modules on every record's (prompt, target_new) answer NLL.

    The loss of a mini-batch is the mean over its records of each record's mean answer-token NLL, so every record
    weighs the same whatever its answer length. After every Adam step each module's delta is projected onto its
    Frobenius ball (see `FineTuneSettings.norm_bound`).
    """

    name = "ft"
    Settings = FineTuneSettings

    def __init__(self, model: nn.Module, tokenizer: Any, settings: EditorSettings | Mapping[str, Any] | None = None) -> None:
        super().__init__(model, tokenizer, settings)
        self.modules = linear_modules(model, self.module_names)
        self.last_history: list[dict[str, float]] = []
        check_prefix_layers(model, self.settings.modules, self.settings.prefix_layers)

    # -- model passes (on the cached prefix when layers are bypassed) --------------------------------------------

    def _batches(self, examples: Sequence[Mapping[str, Any]], size: int, device: torch.device) -> list[dict[str, Tensor]]:
        """Collated batches of `examples`, carrying the bypassed layers' output when `prefix_layers` > 0."""
        layers = self.settings.prefix_layers
        if layers and examples:
            examples = with_states(examples, prefix_states(self.model, examples, layers, self.settings.batch_size))
        dtype = next(iter(self.modules.values())).weight.dtype
        return [{key: value.to(dtype) if key == "inputs_embeds" else value for key, value in batch.items()}
                for batch in batches(examples, size, device)] if examples else []

    def _logits(self, batch: Mapping[str, Tensor], params: Mapping[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(logits, labels) over the batch's answer window only (the same losses, no vocabulary projection of
        prompt positions)."""
        keep = answer_window(batch["labels"])
        bypass = (skipped_prefix(self.model, self.settings.prefix_layers, require_frozen=False)
                  if self.settings.prefix_layers else contextlib.nullcontext())
        with bypass:
            return forward_logits(self.model, batch, params, keep), batch["labels"][:, -keep:]

    # -- what subclasses add ------------------------------------------------------------------------------------

    def _prepare(self, records: Sequence[EditRecord], device: torch.device) -> None:
        """Hook for subclasses: build whatever their extra loss terms need before the first step."""

    def _extra_loss(
        self, batch_index: int, step: int, params: Mapping[str, Tensor], device: torch.device
    ) -> tuple[Tensor | None, dict[str, float]]:
        """Hook for subclasses: an extra loss term for this Adam step (None: none) and numbers to log."""
        return None, {}

    # -- the optimisation ---------------------------------------------------------------------------------------

    def bounds(self) -> dict[str, float | None]:
        """Each module's Frobenius bound on its delta (None: unconstrained), from the current weights."""
        bound = self.settings.norm_bound
        if bound is None:
            return dict.fromkeys(self.modules)
        if not self.settings.norm_relative:
            return dict.fromkeys(self.modules, float(bound))
        return {
            name: float(bound) * float(torch.linalg.matrix_norm(module.weight.detach().float()))
            for name, module in self.modules.items()
        }

    def compute_deltas(self, records: Sequence[EditRecord]) -> dict[str, Tensor]:
        if not records:
            raise ValueError("compute_deltas needs at least one edit record")
        settings = self.settings
        first = next(iter(self.modules.values())).weight
        device = first.device
        edit_batches = self._batches(edit_examples(self.tokenizer, records, settings.max_length), settings.batch_size, device)
        self._prepare(records, device)
        deltas = {
            name: torch.zeros(module.weight.shape, dtype=torch.float32, device=device, requires_grad=True)
            for name, module in self.modules.items()
        }
        leaves = list(deltas.values())
        optimizer = torch.optim.Adam(leaves, lr=settings.lr, weight_decay=settings.weight_decay)
        bounds = self.bounds()
        self.last_history = []
        step = 0
        progress = ProgressLog(f"{self.name}: optimizer steps", settings.steps * len(edit_batches), unit="steps")
        for epoch in range(settings.steps):
            epoch_loss, extras = 0.0, {}
            for index, batch in enumerate(edit_batches):
                params = edited_weights(self.modules, deltas)
                edit_loss = row_nll(*self._logits(batch, params)).mean()
                extra, logged = self._extra_loss(index, step, params, device)
                loss = edit_loss if extra is None else edit_loss + extra
                optimizer.zero_grad(set_to_none=True)
                # `inputs=` keeps every other leaf's .grad untouched, even if the model's parameters require grad.
                loss.backward(inputs=leaves)
                optimizer.step()
                with torch.no_grad():
                    for name, delta in deltas.items():
                        if bounds[name] is not None:
                            project_frobenius(delta, bounds[name])
                epoch_loss += float(edit_loss.detach()) * batch["labels"].shape[0]
                for key, value in logged.items():
                    extras[key] = extras.get(key, 0.0) + value / len(edit_batches)
                step += 1
                progress.update()
            epoch_loss /= len(records)
            self.last_history.append({"epoch": epoch, "edit_loss": epoch_loss, **extras})
            if epoch_loss < settings.early_stop_loss:
                break
        LOG.info("%s: %d epochs, final edit NLL %.4f", self.name, len(self.last_history), self.last_history[-1]["edit_loss"])
        return {name: delta.detach().clone() for name, delta in deltas.items()}


# ----------------------------------------------------------------------------------------------------------------
# FT + KL (locality and replay)


class FineTuneKLSettings(FineTuneSettings):
    """FT-L plus a locality KL on the records' locality probes and a replay term on general text."""

    loc_coef: float = Field(
        1.0, ge=0,
        description="Weight of KL(p_unedited ‖ p_edited) at the answer positions of the locality probes of the "
        "records in the current mini-batch (mean over those positions).",
    )
    replay_coef: float = Field(
        1.0, ge=0,
        description="Weight of the replay term on general text; ignored when no general text is given.",
    )
    replay_loss: Literal["kl", "nll"] = Field(
        "kl",
        description="Replay term: 'kl' = KL(p_unedited ‖ p_edited) over the text's tokens (keeps the model's "
        "behaviour), 'nll' = language-modelling NLL of the text (keeps it fluent, may also change it).",
    )
    general_text: list[str] = Field(
        default_factory=list,
        description="General text for replay, cycled in mini-batches of `replay_batch_size`. Empty (default): no "
        "replay term, the locality probes are the only anchor. A callable may be given to the constructor instead.",
    )
    replay_batch_size: int = Field(8, ge=1, description="General-text strings per Adam step.")
    replay_max_length: int = Field(128, ge=2, description="Tokens kept per general-text string (the start).")


@register
class FineTuneKLEditor(FineTuneEditor):
    """`ft` plus locality KL on the records' locality probes and replay on general text (see the settings).

    `general_text` (constructor) overrides `settings.general_text`: a list of strings, or a callable taking the
    Adam step index and returning that step's strings (e.g. a sampler over a corpus). Without general text the
    replay term is skipped and only the locality probes hold the model in place.
    """

    name = "ft_kl"
    Settings = FineTuneKLSettings

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        settings: EditorSettings | Mapping[str, Any] | None = None,
        *,
        general_text: GeneralText | None = None,
    ) -> None:
        super().__init__(model, tokenizer, settings)
        self.general_text: GeneralText = general_text if general_text is not None else list(self.settings.general_text)
        self._locality: list[dict[str, Tensor] | None] = []
        self._replay: list[dict[str, Tensor]] = []

    def _prepare(self, records: Sequence[EditRecord], device: torch.device) -> None:
        settings = self.settings
        self._locality = []
        for start in range(0, len(records), settings.batch_size):
            examples = locality_examples(self.tokenizer, records[start : start + settings.batch_size], settings.max_length)
            self._locality.append(self._batches(examples, len(examples), device)[0] if examples else None)
        self._replay = []
        if not callable(self.general_text):
            examples = text_examples(self.tokenizer, self.general_text, settings.replay_max_length)
            if self.general_text and not examples:
                LOG.warning("ft_kl: no general-text string has 2 tokens or more; the replay term is skipped")
            self._replay = self._batches(examples, settings.replay_batch_size, device)

    def _replay_batch(self, step: int, device: torch.device) -> dict[str, Tensor] | None:
        if callable(self.general_text):
            examples = text_examples(self.tokenizer, list(self.general_text(step)), self.settings.replay_max_length)
            return self._batches(examples, len(examples), device)[0] if examples else None
        return self._replay[step % len(self._replay)] if self._replay else None

    def _kl(self, batch: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> Tensor:
        with torch.no_grad():
            reference, _ = self._logits(batch)
        logits, labels = self._logits(batch, params)
        total, count = answer_kl(reference, logits, labels)
        return total / max(count, 1)

    def _extra_loss(
        self, batch_index: int, step: int, params: Mapping[str, Tensor], device: torch.device
    ) -> tuple[Tensor | None, dict[str, float]]:
        settings = self.settings
        terms: list[Tensor] = []
        logged: dict[str, float] = {}
        locality = self._locality[batch_index] if batch_index < len(self._locality) else None
        if locality is not None and settings.loc_coef > 0:
            kl = self._kl(locality, params)
            terms.append(settings.loc_coef * kl)
            logged["loc_kl"] = float(kl.detach())
        replay = self._replay_batch(step, device) if settings.replay_coef > 0 else None
        if replay is not None:
            if settings.replay_loss == "kl":
                value = self._kl(replay, params)
            else:
                value = row_nll(*self._logits(replay, params)).mean()
            terms.append(settings.replay_coef * value)
            logged[f"replay_{settings.replay_loss}"] = float(value.detach())
        return (torch.stack(terms).sum() if terms else None), logged
