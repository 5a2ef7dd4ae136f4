"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer"): a covariance-regularised closed form.

No meta-training. For every record MEMIT first finds a target hidden state z at the top edited layer L, at the
record's key position (the last token of its subject): z = h + δ, with δ optimised so that the model, given the
prompt, answers `target_new` (Adam on δ alone, an L2 penalty relative to ‖h‖ and a norm clamp). Then, for each
edited layer ℓ from the bottom up, the keys K (the MLP's down-projection inputs at the key positions, [n, k]) and
the residuals R = (z − h_L) / (layers left) (h_L recomputed with the lower layers already changed) give

    ΔW_ℓ = Rᵀ K (λ·C_ℓ + KᵀK)⁻¹,   C_ℓ = E[k₀k₀ᵀ] over preserved keys,

the least-squares change that writes each residual at its key while moving preserved keys as little as
possible. The preserved keys here are every position of general text (Wikipedia intros, MEMIT's own choice)
and of chat conversations about other facts (the chat template's positions are in every prompt a served model
sees). For an unrelated key k' the change is Rᵀ(K(λC + KᵀK)⁻¹k'): relative to what the edit writes it shrinks
like 1/√(kᵀC⁻¹k), so the rarer a key is under C, the more local its edit.

The key position is the last token of the record's `subject` inside its prompt. A record without a subject
(an API request that sends only a prompt) is keyed at its most distinctive token near a name: among the user
tokens from the rightmost capitalised word on (all of them when there is none; punctuation never), the
rightmost whose Mahalanobis norm kᵀC⁻¹k at the bottom edited layer is at least `guess_ratio` of the largest
(subject names are rare under C; template words are not). Without the window, "What is the capital of
France?" was keyed at " of", which every "capital of X" question shares. How many records were keyed by the
guess is logged.

Departures from the reference (kmeng01/memit), each measured on the embedded default: the target is learned
without the end-of-turn token (`learn_end_of_turn`: the reply starts with the new answer and may go on, which
needs a smaller δ); δ stops moving once its record's answer NLL is below `target_stop_nll` (the reference: 0.05
for the whole batch); no random context prefixes and no essence KL. The model passed in is never changed: the
layers are run with `torch.func.functional_call` on W + ΔW, and δ's gradient is taken with `torch.autograd.grad`.

By default the change is scoped (`scope_threshold`, `trustray.core.editing.scope`): ΔW acts only at positions
whose key is close to one of the edit keys, which is where MEMIT's targets were optimised (δ shifts the key
position alone). The solve is the same; only where its result is applied changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from trustray.core.editing.base import (
    EditModules,
    Editor,
    EditorSettings,
    EditRecord,
    ProgressLog,
    encode_pairs,
)
from trustray.core.editing.finetune import edited_weights, row_nll
from trustray.core.editing.locality import greedy_answers
from trustray.core.editing.metrics import answer_window
from trustray.core.editing.registry import register
from trustray.core.editing.ridge import ridge_solve
from trustray.core.editing.scope import EditScope
from trustray.core.editing.tracing import KeyMoments, linear_modules
from trustray.core.lm.batching import IGNORE_INDEX, collate
from trustray.core.lm.prefix import decoder_layers, prefix_states, skipped_prefix, with_states

LOG = logging.getLogger(__name__)


class MemitSettings(EditorSettings):
    """MEMIT's layers, covariance weight and target optimisation (defaults tuned on SmolLM2-135M-Instruct)."""

    modules: EditModules = Field(
        default_factory=lambda: EditModules(layers=[3, 4, 5, 6, 7]),
        description="Decoder layers whose MLP down-projection is changed (MEMIT edits a run of early-middle "
        "layers; the top one is where the target hidden state z is found).",
    )
    covariance_weight: float = Field(
        1000.0, gt=0, description="λ, the weight of the preserved keys' second moment C against the edit keys "
        "(benchmarks/served_edit_locality.py --tune measures others; docs/editing.md says why this one)."
    )
    general_text: list[str] = Field(
        default_factory=list, description="General text whose every position is a preserved key (part of C)."
    )
    preserved_chats: list[dict[str, str]] = Field(
        default_factory=list,
        description="Chat conversations `{prompt, answer}` about other facts whose every position is a preserved "
        "key (part of C). With `general_text`, at least one is needed.",
    )
    preserve_own_replies: int = Field(
        0, ge=0,
        description="When > 0: each preserved chat's answer is replaced by the unedited model's own greedy reply of "
        "at most this many tokens (keys where the served model's answers are, at the cost of generating them once "
        "in `prepare`); 0 keeps the given answers.",
    )
    target_steps: int = Field(60, ge=1, description="Most Adam steps optimising each record's δ.")
    target_lr: float = Field(0.1, gt=0, description="Adam learning rate on δ.")
    target_stop_nll: float = Field(
        0.3, ge=0, description="A record's δ stops moving once its mean answer-token NLL is below this."
    )
    target_weight_decay: float = Field(0.5, ge=0, description="Penalty weight on ‖δ‖² / ‖h‖².")
    target_clamp: float = Field(4.0, gt=0, description="‖δ‖ is kept at most this times ‖h‖.")
    learn_end_of_turn: bool = Field(
        False, description="Also learn the end-of-turn token after the target (the reply is then exactly the target)."
    )
    scope_threshold: float | None = Field(
        0.7, ge=-1, le=1,
        description="ΔW acts only at token positions whose key has at least this cosine with one of the edit keys "
        "(`trustray.core.editing.scope`; unrelated prompts are answered exactly as before); null: a plain weight "
        "change that acts everywhere, as in the MEMIT paper, and can be exported as LoRA or run on vLLM.",
    )
    guess_ratio: float = Field(
        0.5, gt=0, le=1,
        description="For a record without a subject: the key is the rightmost token of the guess window "
        "(`PromptPositions.guess_window`) whose Mahalanobis norm is at least this fraction of the window's largest.",
    )


def _token_batch(rows: Sequence[Sequence[int]], device: torch.device) -> dict[str, Tensor]:
    """Right-padded `input_ids` and `attention_mask` of token rows (no labels needed)."""
    batch = collate([{"input_ids": list(row), "labels": list(row)} for row in rows], 0)
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


def _layer_output(output: Any) -> Tensor:
    """A decoder layer's hidden states, whether it returns a tensor or a tuple starting with one."""
    return output[0] if isinstance(output, tuple) else output


class PromptPositions:
    """A prompt rendered with the chat template: token ids, character offsets and where the user text is."""

    def __init__(self, tokenizer: Any, prompt: str) -> None:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        self.ids: list[int] = list(encoded["input_ids"])
        self.offsets: list[tuple[int, int]] = [tuple(pair) for pair in encoded["offset_mapping"]]
        self.user_start = text.rfind(prompt)
        if self.user_start < 0:
            raise ValueError(f"the chat template does not render the prompt verbatim: {prompt[:80]!r}")
        self.prompt = prompt

    def tokens_within(self, start: int, end: int) -> list[int]:
        """Token indices overlapping prompt characters [start, end)."""
        first, last = self.user_start + start, self.user_start + end
        return [i for i, (a, b) in enumerate(self.offsets) if a < last and b > first]

    def guess_window(self) -> list[int]:
        """The user tokens a subject-less prompt's key is guessed among: from the rightmost capitalised word
        (not the prompt's first) to the end, or all user tokens when there is none; punctuation-only tokens
        excluded. Names are capitalised, and the words after one may complete it ("Vacuum cleaner")."""
        words = list(re.finditer(r"\w[\w'-]*", self.prompt))
        names = [word for word in words[1:] if word.group()[0].isupper() or word.group()[0].isdigit()]
        start = names[-1].start() if names else 0
        tokens = [t for t in self.tokens_within(start, len(self.prompt))
                  if re.search(r"\w", self.prompt[max(0, self.offsets[t][0] - self.user_start):
                                                    self.offsets[t][1] - self.user_start])]
        return tokens or self.tokens_within(0, len(self.prompt))

    def subject_last(self, subject: str) -> int | None:
        """The last token of the last occurrence of `subject` in the prompt, or None when it does not occur."""
        found = self.prompt.rfind(subject) if subject else -1
        if found < 0:
            return None
        tokens = self.tokens_within(found, found + len(subject))
        return tokens[-1] if tokens else None


class _KeysCollected(Exception):
    """Ends a statistics pass once the top edited layer has run."""


def _stop_forward(module: nn.Module, args: tuple, output: Tensor) -> None:
    raise _KeysCollected


@dataclass
class MemitTargets:
    """What `MemitEditor.target_plan` found for some records: their prompts, key positions and targets z."""

    prompts: list[PromptPositions]
    positions: list[int]
    targets: Tensor


@register
class MemitEditor(Editor):
    """MEMIT on the chat model: records in, `{down_proj name: ΔW}` out (see the module docstring)."""

    name = "memit"
    Settings = MemitSettings
    keeps_work = True

    def __init__(self, model: nn.Module, tokenizer: Any, settings: EditorSettings | Mapping[str, Any] | None = None) -> None:
        super().__init__(model, tokenizer, settings)
        if not self.settings.general_text and not self.settings.preserved_chats:
            raise ValueError("memit needs preserved keys: give general_text and/or preserved_chats")
        self.modules = linear_modules(model, self.module_names)
        self.top_layer = max(int(name.split(".")[2]) for name in self.module_names)
        if self.top_layer >= model.config.num_hidden_layers - 1:
            raise ValueError("memit finds its targets at the output of the top edited layer, so that layer must be "
                             f"below the last decoder layer; got layers {self.settings.modules.layers}")
        self.device = next(model.parameters()).device
        self._moments: dict[str, Tensor] | None = None
        self._scope: EditScope | None = None
        self.guessed_keys = 0  # records of the last call keyed at a guessed token (no subject found)

    # -- preserved keys -----------------------------------------------------------------------------------------

    def prepare(self) -> None:
        self.moments()

    def edit_scope(self) -> EditScope | None:
        return self._scope

    def moments(self) -> dict[str, Tensor]:
        """C per edited module (float64), computed once from the settings' text and chats."""
        if self._moments is None:
            rows = self._statistics_ids()
            sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=self.device)
                    for name, m in self.modules.items()}
            count = 0
            progress = ProgressLog("memit preserved keys", len(rows), "sequences")
            with KeyMoments(self.modules, sums) as tracer, torch.no_grad():
                # The layers above the top edited one add nothing to C: each pass stops once that layer has run
                # (its modules' keys are counted by then).
                stop = decoder_layers(self.model)[self.top_layer].register_forward_hook(_stop_forward)
                try:
                    for start in range(0, len(rows), self.settings.batch_size):
                        chunk = rows[start : start + self.settings.batch_size]
                        batch = _token_batch(chunk, self.device)
                        tracer.mask = batch["attention_mask"].bool()
                        with contextlib.suppress(_KeysCollected):
                            self.model(**batch, logits_to_keep=1)
                        count += int(tracer.mask.sum())
                        progress.update(len(chunk))
                finally:
                    stop.remove()
            LOG.info("memit: second moments of %d preserved keys per layer", count)
            self._moments = {name: total / count for name, total in sums.items()}
        return self._moments

    def _statistics_ids(self) -> list[list[int]]:
        length = self.settings.max_length
        ids = [list(self.tokenizer(text, truncation=True, max_length=length)["input_ids"])
               for text in self.settings.general_text]
        prompts, answers = self.preserved_conversations()
        ids += [example["input_ids"] for example in encode_pairs(self.tokenizer, prompts, answers, length)]
        return [row for row in ids if row]

    def preserved_conversations(self) -> tuple[list[str], list[str]]:
        """(prompts, answers) of the preserved chats: the given answers, or the model's own replies (an empty
        reply keeps the given answer)."""
        prompts = [chat["prompt"] for chat in self.settings.preserved_chats]
        answers = [chat["answer"] for chat in self.settings.preserved_chats]
        if self.settings.preserve_own_replies and prompts:
            replies = greedy_answers(self.model, self.tokenizer, prompts, self.settings.preserve_own_replies,
                                     batch_size=self.settings.batch_size)
            answers = [reply.strip() or given for reply, given in zip(replies, answers, strict=True)]
        return prompts, answers

    # -- key positions ------------------------------------------------------------------------------------------

    def key_positions(self, prompts: Sequence[PromptPositions], subjects: Sequence[str]) -> list[int]:
        """Each prompt's key token: its subject's last token, or the guess of the module docstring."""
        positions: list[int | None] = [p.subject_last(s) for p, s in zip(prompts, subjects, strict=True)]
        missing = [i for i, position in enumerate(positions) if position is None]
        self.guessed_keys = len(missing)
        if missing:
            bottom = self.module_names[0]
            inverse = torch.linalg.inv(self.moments()[bottom])
            for i in missing:
                keys, _ = self.hidden_at([prompts[i]], None, {}, bottom)
                mahalanobis = torch.einsum("ti,ij,tj->t", keys[0].double(), inverse, keys[0].double())
                window = prompts[i].guess_window()
                largest = max(float(mahalanobis[t]) for t in window)
                positions[i] = max(t for t in window if float(mahalanobis[t]) >= self.settings.guess_ratio * largest)
            LOG.info("memit: %d of %d records had no subject in their prompt; keyed at their most distinctive token",
                     len(missing), len(prompts))
        return [int(p) for p in positions]

    # -- model passes -------------------------------------------------------------------------------------------

    def hidden_at(self, prompts: Sequence[PromptPositions], positions: Sequence[int] | None,
                  deltas: Mapping[str, Tensor], key_module: str | None = None) -> tuple[Tensor | None, Tensor | None]:
        """(inputs of `key_module`, top-layer outputs) for the prompts with `deltas` added to the weights: at
        `positions` ([n, k], [n, hidden]), or at every position when `positions` is None ([B, T, k], None)."""
        batch = _token_batch([p.ids for p in prompts], self.device)
        captured: dict[str, Tensor] = {}
        handles = [decoder_layers(self.model)[self.top_layer].register_forward_hook(
            lambda module, args, output: captured.__setitem__("hidden", _layer_output(output)))]
        if key_module is not None:
            handles.append(self.modules[key_module].register_forward_pre_hook(
                lambda module, args: captured.__setitem__("keys", args[0])))
        try:
            with torch.no_grad():
                torch.func.functional_call(self.model, edited_weights(self.modules, deltas), args=(),
                                           kwargs={**batch, "logits_to_keep": 1})
        finally:
            for handle in handles:
                handle.remove()
        keys = captured.get("keys")
        if positions is None:
            return (keys.float() if keys is not None else None), None
        index = torch.arange(len(prompts), device=self.device), torch.tensor(list(positions), device=self.device)
        return (keys[index].float() if keys is not None else None), captured["hidden"][index].float()

    def targets(self, records: Sequence[EditRecord], positions: Sequence[int]) -> Tensor:
        """z [n, hidden] per record: the top layer's hidden state at its key position plus the optimised δ. With a
        `work_cache`, a record found there is not optimised again and each optimised batch is stored as it ends, so
        a search of hours that stops resumes where it stopped. Each record's δ is its own, with one exception: a
        record that reaches the stopping NLL still moves on its Adam momentum until its whole batch stops. A resumed
        search, or parts split at multiples of the batch size (`do_work`), keep the batches of one search."""
        cache = self.work_cache
        keys = [self.target_key(record, position) for record, position in zip(records, positions, strict=True)]
        found: dict[int, Tensor] = {}
        self.reused_seconds = 0.0
        if cache is not None:
            for index, key in enumerate(keys):
                entry = cache.get(key)
                if entry is not None:
                    found[index] = entry["target"].to(self.device)
                    self.reused_seconds += float(entry["seconds"])
            if found:
                LOG.info("memit: %d of %d targets taken from the work cache (%.0f s of earlier search)", len(found),
                         len(records), self.reused_seconds)
        todo = [index for index in range(len(records)) if index not in found]
        progress = ProgressLog("memit targets", len(todo))
        size = self.settings.batch_size
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            began = time.perf_counter()
            targets = self._optimise_targets([records[i] for i in chunk], [positions[i] for i in chunk])
            share = (time.perf_counter() - began) / len(chunk)
            for index, target in zip(chunk, targets, strict=True):
                found[index] = target
                if cache is not None:
                    cache[keys[index]] = {"target": target.cpu().clone(), "seconds": share}  # a row, not its batch
            progress.update(len(chunk))
        return torch.stack([found[index] for index in range(len(records))])

    def do_work(self, records: Sequence[EditRecord]) -> None:
        if self.work_cache is None:
            raise ValueError("do_work needs a work_cache to keep the targets in")
        self.target_plan(records)

    def target_key(self, record: EditRecord, position: int) -> str:
        """What a record's target depends on besides the weights: its conversation, key position, top layer and
        the search's settings (a hex digest, usable as a file name)."""
        search = self.settings.model_dump(include={"max_length", "target_steps", "target_lr", "target_stop_nll",
                                                   "target_weight_decay", "target_clamp", "learn_end_of_turn"})
        described = {"prompt": record["prompt"], "target_new": record["target_new"], "position": position,
                     "top_layer": self.top_layer, **search}
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()

    def _optimise_targets(self, records: Sequence[EditRecord], positions: Sequence[int]) -> Tensor:
        """z for a batch of records. The layers up to L do not depend on δ: their output is computed once and fed
        back with δ added while they are bypassed (`trustray.core.lm.prefix`), so each Adam step runs only the
        layers above L and the vocabulary projection of the answer positions."""
        examples = encode_pairs(self.tokenizer, [r["prompt"] for r in records], [r["target_new"] for r in records],
                                self.settings.max_length)
        if not self.settings.learn_end_of_turn:
            for example in examples:
                if sum(label != IGNORE_INDEX for label in example["labels"]) > 1:
                    example["labels"][-1] = IGNORE_INDEX
        bypassed = self.top_layer + 1
        states = prefix_states(self.model, examples, bypassed, self.settings.batch_size)
        batch = {k: v.to(self.device) for k, v in collate(with_states(examples, states), 0).items()}
        dtype = next(self.model.parameters()).dtype
        rows = torch.arange(len(records), device=self.device)
        where = torch.tensor(list(positions), device=self.device)
        base = batch["inputs_embeds"][rows, where].float()
        keep = answer_window(batch["labels"])
        labels = batch["labels"][:, -keep:]
        delta = torch.zeros_like(base, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=self.settings.target_lr)
        active = torch.ones(len(records), dtype=torch.bool, device=self.device)
        bound = self.settings.target_clamp * base.norm(dim=1, keepdim=True)
        with skipped_prefix(self.model, bypassed, require_frozen=False):
            for _ in range(self.settings.target_steps):
                shift = torch.zeros_like(batch["inputs_embeds"]).index_put((rows, where), delta.to(dtype))
                logits = self.model(inputs_embeds=batch["inputs_embeds"] + shift,
                                    attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
                nll = row_nll(logits, labels)
                active &= nll.detach() >= self.settings.target_stop_nll
                if not active.any():
                    break
                penalty = delta.pow(2).sum(dim=1) / base.pow(2).sum(dim=1)
                loss = ((nll + self.settings.target_weight_decay * penalty) * active).sum()
                (gradient,) = torch.autograd.grad(loss, [delta])
                delta.grad = gradient * active[:, None]
                optimizer.step()
                with torch.no_grad():
                    delta.mul_(torch.clamp(bound / delta.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0))
        if active.any():
            LOG.warning("memit: %d of %d targets still have an answer NLL above %.2f after %d steps (largest %.2f)",
                        int(active.sum()), len(records), self.settings.target_stop_nll, self.settings.target_steps,
                        float(nll.detach().max()))
        return base + delta.detach()

    # -- the edit -----------------------------------------------------------------------------------------------

    def compute_deltas(self, records: Sequence[EditRecord]) -> dict[str, Tensor]:
        """`{down_proj name: ΔW}` (float32, shaped like the weight) writing every record's `target_new` at once."""
        return self.spread(self.target_plan(records))

    def target_plan(self, records: Sequence[EditRecord]) -> MemitTargets:
        """Each record's key position and target z on the current weights: the part of an edit that does not
        depend on the covariance weight or the scope, so settings of those can be compared on one plan."""
        if not records:
            raise ValueError("compute_deltas needs at least one edit record")
        prompts = [PromptPositions(self.tokenizer, r["prompt"]) for r in records]
        positions = self.key_positions(prompts, [r.get("subject") or "" for r in records])
        return MemitTargets(prompts, positions, self.targets(records, positions))

    def spread(self, plan: MemitTargets) -> dict[str, Tensor]:
        """The residual of `plan`'s targets spread over the layers from the bottom up, one closed form per layer."""
        prompts, positions, targets = plan.prompts, plan.positions, plan.targets
        moments = self.moments()
        deltas: dict[str, Tensor] = {}
        edit_keys: dict[str, Tensor] = {}
        self._scope = None
        for done, name in enumerate(self.module_names):
            keys, hidden = [], []
            for start in range(0, len(prompts), self.settings.batch_size):
                part = slice(start, start + self.settings.batch_size)
                k, h = self.hidden_at(prompts[part], positions[part], deltas, name)
                keys.append(k)
                hidden.append(h)
            residuals = (targets - torch.cat(hidden)) / (len(self.module_names) - done)
            prior = self.settings.covariance_weight * moments[name]
            edit_keys[name] = torch.cat(keys)
            shift = ridge_solve(edit_keys[name].double(), residuals.double(), 0.0, prior)
            deltas[name] = shift.T.float().contiguous()
        if self.settings.scope_threshold is not None:
            self._scope = EditScope(edit_keys, self.settings.scope_threshold)
        return deltas
