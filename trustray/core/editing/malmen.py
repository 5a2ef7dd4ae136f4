"""MALMEN (Tan et al., ICLR 2024): a meta-learned hyper-network that writes many facts into a model at once.

For each edited Linear layer (keys k = its inputs, values v = its outputs) MALMEN caches, at every position that
predicts an answer token of an edit, the key k_j and the value gradient g_j = ∂L_edit/∂v_j. A hyper-network
(`ShiftNet`, one per weight shape, shared by the layers of that shape) maps the normalised pair to (k̃_j, g̃_j) and
each token asks for its own value difference d_j = −η (k_j·k̃_j) g̃_j (MEND's rank-one shift −η g̃_j k̃_jᵀ applied to
its own key). One ridge solve per layer then finds the weight shift S that best realises all of them together:
S = (KᵀK + λI)⁻¹KᵀD (`trustray.core.editing.ridge`; the nn.Linear weight change is Sᵀ). Summing shifts instead (MEND)
lets the edits of many facts cancel; the least-squares combination is what lets MALMEN edit thousands at once.

Meta-training (`meta_step`) follows the reference's two-stage backward, whose memory does not grow with the number
of edited tokens: the shifts are computed without a graph and applied; the meta-loss (answer NLL on a paraphrase of
each edit + `loc_coef`·KL(pre ‖ post) on a locality question's answer + optionally `retention_coef`·KL(pre ‖ post)
on general text, like PPO-ptx) is back-propagated to the edited weights only, giving G = ∂L/∂S; `ridge_backward`
turns it into ∂L/∂D and ∂L/∂λ; then the hyper-network is re-run chunk by chunk (`hyper_chunk` rows) and the proxy
Σ_j ⟨∂L/∂d_j, d_j⟩, which has the same gradient, is back-propagated with one chunk's graph alive at a time.
Each loss is a sum over LM sub-batches (`batch_size` conversations) of the sub-batch's mean, as in the reference.

Choices that differ from, or are implicit in, the reference code:

- η is learned in log space (the reference learns η itself). Adam's steps are of a fixed absolute size, so a
  linear η whose right scale is unknown either barely moves or jumps by orders of magnitude; in log space
  `scalar_lr` is a relative rate, the same for η and λ (default 1e-2: at most about 1% per step, so a few hundred
  steps can move either by a factor of e² or more). With the reference's single meta_lr of 1e-5 both would stay
  at their initial values over a whole training run.
- η₀ = 1e-3 rather than the reference's 1e-6 (chosen for GPT-J): measured on SmolLM2-135M-Instruct with 32
  bundled train edits, layers 24–29, an untrained net (normaliser fitted on those rows) and λ = 1, the edit NLL
  is 12.9 unedited, 8.3 at η = 1e-4, 0.28 at 1e-3 (teacher-forced ES 0.96) and 54 at 1e-2. λ₀ = 1 (log λ = 0)
  as in the reference: the mean diagonal of KᵀK over those 127 cached tokens is 48–1,519 per layer, so the solve
  starts close to the minimum-norm interpolation, and λ is then learned.
- The base model never accumulates gradients: caching and the meta-loss use `torch.autograd.grad` with respect to
  the edited weights, and while the editor runs, only those weights require grad (every flag is restored after;
  this also lets the frozen prefix be skipped). `.grad` of every model parameter is left as it was.
- The hyper-network's ReLU is `clamp(min=0)`, as in the reference: at the identity initialisation (B = 0, bias 0)
  every pre-activation is exactly 0, where `relu` passes no gradient and the blocks would never leave the identity.
- One paraphrase and one locality item per record and step, drawn with `random.Random(f"{seed}:{step}")`, so a
  resumed run draws what an uninterrupted one would. A record without paraphrases uses its prompt.
- The input normaliser is updated by training steps only (`cache(..., update_normalizers=True)`), never by
  `compute_deltas`: evaluation data does not leak into it (the reference also updates it on validation batches).
  It is the identity until it has seen two rows.
- With `prefix_layers` > 0, the decoder layers below the lowest edited one are run once per call and bypassed
  (`trustray.core.lm.prefix`); the results are the same as with the full model.
- No key where the chat template's end-of-turn token is predicted (`key_end_of_turn`, off by default; the
  reference has no chat template). That position is in every edit, so it spent about one key in four of the
  solve on a token the metrics never score, and every edit's value there pulled against the others'.
- Keys at the subject's last token instead of the answer tokens (`key_position: subject`), MEMIT's position:
  same-relation facts share most of their answer-position key (`benchmarks/edit_key_specificity.py`), so a
  solve cannot tell them apart there.
- The preserved-key weight can count in edit keys (`preserve_units: edit_keys`, μ = ρ·n): with a weight in rows
  the prior is fixed while KᵀK grows with the number of edits, so an editor meta-trained on 64 edits per step
  saw a prior about 16 times stronger, relative to its edits, than it meets at 1,024.
- `rounds` (inference only, not in the paper): once many facts overfill a layer's key space, one solve leaves
  many of them unwritten, and a larger η buys ES at a steep locality cost (SmolLM2, 1,024 edits: η ×2 took ES
  0.55 → 0.73 and LS 0.59 → 0.19). Solving again on the edited model gives the unwritten facts fresh value
  gradients, MEMIT-like.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from trustray.core.editing.base import (
    Editor,
    EditorSettings,
    EditRecord,
    ProgressLog,
    batches,
    check_prefix_layers,
    encode_pairs,
)
from trustray.core.editing.editset import EditSet
from trustray.core.editing.memit import PromptPositions
from trustray.core.editing.metrics import agreement, answer_window, token_accuracy
from trustray.core.editing.normalize import RunningStats
from trustray.core.editing.registry import register
from trustray.core.editing.ridge import ridge_backward, ridge_solve, ridge_solve_gram
from trustray.core.editing.tracing import KeyMoments, KeyValueTracer, edit_positions, linear_modules
from trustray.core.lm.losses import model_inputs
from trustray.core.lm.prefix import prefix_states, skipped_prefix, with_states

Cache = dict[str, tuple[Tensor, Tensor]]


class MalmenSettings(EditorSettings):
    """MALMEN's hyper-network and meta-training settings (reference defaults unless noted)."""

    rank: int = Field(1920, ge=1, description="Rank of each hyper-network block; at most key + value size of every edited weight shape.")
    n_blocks: int = Field(2, ge=1, description="Residual low-rank blocks per hyper-network.")
    lr_init: float = Field(1e-3, gt=0, description="Initial per-layer step η of the value differences d = −η (k·k̃) g̃ (learned in log space).")
    log_lambda_init: float = Field(0.0, description="Initial per-layer log λ of the ridge penalty (λ₀ = 1).")
    meta_lr: float = Field(1e-5, gt=0, description="Adam learning rate of the hyper-network weights.")
    scalar_lr: float = Field(1e-2, gt=0, description="Adam learning rate of the per-layer log η and log λ (a relative rate).")
    loc_coef: float = Field(1.0, ge=0, description="Weight of the locality KL(pre ‖ post) on the locality answers.")
    retention_coef: float = Field(0.0, ge=0, description="Weight of the KL(pre ‖ post) on general text (0: off); needs `general` texts.")
    preserve_weight: float = Field(0.0, ge=0, description="μ of the preserved-key term: the solve is (KᵀK + μ·E[k₀k₀ᵀ] + μₜ·E[ttᵀ] + λI)⁻¹KᵀD with k₀ the answer keys `fit_preservation` saw (0: off). In units of rows: μ = 1000 weighs like 1,000 typical preserved keys asked to keep their values.")
    preserve_text_weight: float = Field(0.0, ge=0, description="μₜ of the general-text keys t: every position of the texts `fit_text_preservation` saw (0: off). Chat answer keys alone leave the directions plain text uses free, which costs perplexity.")
    preserve_units: Literal["rows", "edit_keys"] = Field("rows", description="What μ and μₜ count: 'rows' (the term weighs like that many preserved keys, whatever the number of edits) or 'edit_keys' (μ = ρ·n with n the edit keys of the solve, so the balance between edits and preserved keys is the same at every number of edits, in meta-training and at inference alike).")
    key_position: Literal["answer", "subject"] = Field("answer", description="Where the edit keys are: 'answer' caches one key per answer token, at the position predicting it (the reference); 'subject' one key per edit, at the last token of the record's `subject` in its prompt (MEMIT's position, where facts about the same relation share far less of their key), with the value gradient the answer NLL sends back there through attention. 'subject' needs every record (and preserved fact) to name a subject found in its prompt.")
    key_end_of_turn: bool = Field(False, description="Also cache a key where the model predicts the chat template's end-of-turn token after the answer. Off: only the answer's own tokens give keys and value gradients (the end-of-turn position is in every edit, and spent about one key in four of the solve's budget on a token nobody scores).")
    rounds: int = Field(1, ge=1, description="Editing rounds of `compute_deltas`: each round re-traces the edits on the model with the shifts found so far applied and solves again, so facts the earlier rounds left unwritten get new value gradients (already-written ones have small ones). Inference only; meta-training uses one round.")
    round_step: float = Field(1.0, gt=0, description="Factor on each round's solved shift. With rounds = 2 and 0.5, the first round writes half of the shift a single solve would.")
    max_grad_norm: float = Field(1.0, gt=0, description="Clip of the hyper-networks' meta-gradient norm.")
    hyper_chunk: int = Field(1024, ge=1, description="Cached rows per hyper-network pass (bounds the memory of stage two).")
    prefix_layers: int = Field(0, ge=0, description="Decoder layers run once per call and bypassed (≤ the lowest edited layer).")
    seed: int = Field(0, description="Seed of the hyper-network initialisation and of the paraphrase/locality draws.")


class RunningNormalizer(RunningStats):
    """Standardises hyper-network inputs with running statistics; the identity until two rows have been seen."""

    def forward(self, rows: Tensor) -> Tensor:
        if self.count < 2:
            return rows
        mean, std = self.stats()
        eps = torch.finfo(torch.float32).eps
        return (rows - mean.to(rows.dtype)) / (std.to(rows.dtype) + eps)


class ShiftBlock(nn.Module):
    """y + scale[ℓ]·relu(y A B + bias) + shift[ℓ]: a low-rank residual block that is the identity at init (B = 0).

    scale/shift are the per-layer embeddings that let one network serve all layers of a shape.
    """

    def __init__(self, size: int, rank: int, n_layers: int, generator: torch.Generator) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(size, rank, generator=generator))
        self.b = nn.Parameter(torch.zeros(rank, size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.scale = nn.Parameter(torch.ones(n_layers, size))
        self.shift = nn.Parameter(torch.zeros(n_layers, size))

    def forward(self, rows: Tensor, layer: int) -> Tensor:
        # clamp, not relu: at init the pre-activation is exactly 0, where relu's gradient is 0 (module docstring).
        hidden = (rows @ self.a @ self.b + self.bias).clamp(min=0)
        return self.scale[layer] * hidden + self.shift[layer] + rows


class ShiftNet(nn.Module):
    """MALMEN's hyper-network for the layers of one weight shape: (k, g) → (k̃, g̃), plus per-layer log η, log λ."""

    def __init__(
        self, key_size: int, value_size: int, rank: int, n_blocks: int, n_layers: int, lr_init: float,
        log_lambda_init: float, generator: torch.Generator,
    ) -> None:
        super().__init__()
        if rank > key_size + value_size:
            raise ValueError(f"rank {rank} exceeds key + value size {key_size + value_size} of a {key_size}→{value_size} layer")
        self.key_size, self.value_size = key_size, value_size
        self.normalizer = RunningNormalizer(key_size + value_size)
        self.blocks = nn.ModuleList(ShiftBlock(key_size + value_size, rank, n_layers, generator) for _ in range(n_blocks))
        self.log_lr = nn.Parameter(torch.full((n_layers,), math.log(lr_init)))
        self.log_lambda = nn.Parameter(torch.full((n_layers,), float(log_lambda_init)))

    def forward(self, keys: Tensor, grads: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """(k̃ [n, key], g̃ [n, value]): the blocks applied to the normalised concatenation, split back."""
        rows = self.normalizer(torch.cat([keys, grads], dim=-1))
        for block in self.blocks:
            rows = block(rows, layer)
        pseudo_keys, pseudo_grads = rows.split([self.key_size, self.value_size], dim=-1)
        return pseudo_keys, pseudo_grads

    def value_diffs(self, keys: Tensor, grads: Tensor, layer: int) -> Tensor:
        """d_j = −η (k_j·k̃_j) g̃_j [n, value], with the raw key k_j (as in the reference)."""
        pseudo_keys, pseudo_grads = self(keys, grads, layer)
        return -self.log_lr[layer].exp() * (keys * pseudo_keys).sum(-1, keepdim=True) * pseudo_grads


def _answer_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean NLL of the labelled tokens (transformers alignment: logits at t predict labels at t + 1)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def _kl(pre_logits: Tensor, post_logits: Tensor, labels: Tensor) -> Tensor:
    """KL(p_pre ‖ p_post) summed over the vocabulary, averaged over the positions that predict a label."""
    mask = labels[:, 1:] != -100
    pre = pre_logits[:, :-1][mask].log_softmax(-1)
    post = post_logits[:, :-1][mask].log_softmax(-1)
    return F.kl_div(post, pre, log_target=True, reduction="batchmean")


def _predictions(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(argmax [B, T−1], targets, mask) at the answer positions, as `metrics.answer_predictions` aligns them."""
    targets = labels[:, 1:]
    return logits[:, :-1].argmax(-1), targets, targets != -100


@register
class MalmenEditor(Editor):
    """MALMEN editor: `compute_deltas` edits with the current hyper-networks, `meta_step` trains them.

    The editor holds one `ShiftNet` per distinct (in, out) shape of the edited layers (`nets`, keyed "in x out"),
    its Adam optimizer (created on first use) and the number of meta steps taken; `state_dict` saves all three.
    """

    name = "malmen"
    Settings = MalmenSettings
    meta_learned = True
    settings: MalmenSettings

    def __init__(self, model: nn.Module, tokenizer: Any, settings: MalmenSettings | Mapping[str, Any] | None = None) -> None:
        super().__init__(model, tokenizer, settings)
        self.modules = linear_modules(model, self.module_names)
        check_prefix_layers(self.model, self.settings.modules, self.settings.prefix_layers)
        last = model.config.num_hidden_layers - 1
        if self.settings.key_position == "subject" and any(f"layers.{last}." in name for name in self.module_names):
            raise ValueError(f"key_position 'subject' needs every edited layer below the last ({last}): there the "
                             "subject's position has no path to the answer, so its value gradient is zero")
        weight = next(iter(self.modules.values())).weight
        self.device, self.dtype = weight.device, weight.dtype
        shapes: dict[str, list[str]] = {}
        for name, module in self.modules.items():
            shapes.setdefault(f"{module.in_features}x{module.out_features}", []).append(name)
        self.slots = {name: (key, layer) for key, names in shapes.items() for layer, name in enumerate(names)}
        generator = torch.Generator().manual_seed(self.settings.seed)
        self.nets = nn.ModuleDict({key: self._make_net(names, generator) for key, names in shapes.items()}).to(self.device)
        self.steps = 0
        self._optimizer: torch.optim.Adam | None = None
        self.preserved: dict[str, Tensor] = {}
        self.preserved_text: dict[str, Tensor] = {}

    def _make_net(self, names: list[str], generator: torch.Generator) -> ShiftNet:
        module, s = self.modules[names[0]], self.settings
        return ShiftNet(
            module.in_features, module.out_features, s.rank, s.n_blocks, len(names), s.lr_init, s.log_lambda_init, generator
        )


    def hypernet(self, name: str) -> tuple[ShiftNet, int]:
        """The ShiftNet serving edited module `name` and the module's layer index within it."""
        key, layer = self.slots[name]
        return self.nets[key], layer

    # ---- model passes -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _session(self) -> Iterator[list[Tensor]]:
        """Only the edited weights require grad (so nothing else gets a graph and the prefix can be skipped).

        Gradients are enabled inside, so `compute_deltas` also works when called under `torch.no_grad()`.
        """
        params = list(self.model.parameters())
        flags = [param.requires_grad for param in params]
        weights = [module.weight for module in self.modules.values()]
        try:
            for param in params:
                param.requires_grad_(False)
            for weight in weights:
                weight.requires_grad_(True)
            with torch.enable_grad(), skipped_prefix(self.model, self.settings.prefix_layers):
                yield weights
        finally:
            for param, flag in zip(params, flags, strict=True):
                param.requires_grad_(flag)

    def _with_prefix(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Examples carrying their cached prefix output when layers are bypassed (run on the full model)."""
        if not self.settings.prefix_layers or not examples:
            return examples
        states = prefix_states(self.model, examples, self.settings.prefix_layers, self.settings.batch_size)
        return with_states(examples, states)

    def _pairs(self, prompts: Sequence[str], answers: Sequence[str]) -> list[dict[str, Any]]:
        return self._with_prefix(encode_pairs(self.tokenizer, prompts, answers, self.settings.max_length))

    def _edit_pairs(self, prompts: Sequence[str], answers: Sequence[str],
                    subjects: Sequence[str | None] | None = None) -> list[dict[str, Any]]:
        """The pairs whose keys are cached: without `key_end_of_turn`, special tokens (the template's end of turn)
        are unlabelled, so no key predicts them and their NLL adds no value gradient. With `key_position`
        "subject", each pair also carries `key_index`: its subject's last prompt token."""
        examples = encode_pairs(self.tokenizer, prompts, answers, self.settings.max_length)
        if not self.settings.key_end_of_turn:
            special = set(self.tokenizer.all_special_ids)
            examples = [{**example, "labels": [-100 if label in special else label for label in example["labels"]]}
                        for example in examples]
        if self.settings.key_position == "subject":
            subjects = list(subjects) if subjects is not None else [None] * len(prompts)
            for example, prompt, subject in zip(examples, prompts, subjects, strict=True):
                positions = PromptPositions(self.tokenizer, prompt)
                index = positions.subject_last(subject) if subject else None
                if index is None:
                    raise ValueError(f"key_position 'subject' needs the subject in the prompt; {subject!r} is not in "
                                     f"{prompt[:80]!r}")
                if example["input_ids"][: index + 1] != positions.ids[: index + 1]:
                    raise ValueError(f"the conversation does not start with the prompt's tokens: {prompt[:80]!r}")
                example["key_index"] = index
        return self._with_prefix(examples)

    def _key_masks(self, examples: Sequence[Mapping[str, Any]]) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        """(batch, mask of its key positions): each pair's `key_index` when it has one, else every position
        that predicts a labelled token."""
        size = self.settings.batch_size
        for start, batch in zip(range(0, len(examples), size), self._batches(examples), strict=True):
            chunk = examples[start : start + size]
            if "key_index" not in chunk[0]:
                yield batch, edit_positions(batch["labels"])
                continue
            mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
            mask[torch.arange(len(chunk)), torch.tensor([example["key_index"] for example in chunk])] = True
            yield batch, mask.to(batch["labels"].device)

    def _texts(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """General text with every token labelled (at least two tokens, so some position predicts one)."""
        examples = []
        for text in texts:
            ids = self.tokenizer(text, truncation=True, max_length=self.settings.max_length)["input_ids"]
            if len(ids) >= 2:
                examples.append({"input_ids": list(ids), "labels": list(ids)})
        return self._with_prefix(examples)

    def _batches(self, examples: Sequence[Mapping[str, Any]]) -> list[dict[str, Tensor]]:
        cast = {"inputs_embeds": self.dtype}
        return [
            {key: value.to(cast[key]) if key in cast else value for key, value in batch.items()}
            for batch in batches(examples, self.settings.batch_size, self.device)
        ]

    def _logits(self, batch: Mapping[str, Tensor], keep: int) -> Tensor:
        """Logits of the last `keep` positions (float32)."""
        return self.model(**model_inputs(dict(batch)), logits_to_keep=keep).logits.float()

    # ---- caching and solving ------------------------------------------------------------------------------------

    def cache(self, records: Sequence[EditRecord], update_normalizers: bool = False) -> Cache:
        """`{module: (K [n, in], G [n, out])}` at the n positions predicting a `target_new` token.

        G is the gradient of the sum over sub-batches of each sub-batch's mean answer NLL. Training steps pass
        `update_normalizers=True` so the hyper-networks' input statistics follow the cached rows.
        """
        examples = self._edit_pairs([r["prompt"] for r in records], [r["target_new"] for r in records],
                                    [r.get("subject") for r in records])
        with self._session() as weights:
            return self._cache(examples, weights, update_normalizers)

    def _cache(self, examples: list[dict[str, Any]], weights: list[Tensor], update_normalizers: bool) -> Cache:
        with KeyValueTracer(self.modules, torch.zeros(1, 1, dtype=torch.bool)) as tracer:
            for batch, tracer.mask in self._key_masks(examples):
                keep = answer_window(batch["labels"])  # the same NLL without projecting the prompt positions
                logits = self.model(**model_inputs(dict(batch)), logits_to_keep=keep).logits.float()
                # Weighted by the sub-batch's share of a full one: a partial last sub-batch (or a single edit) gets
                # value gradients of the scale the hyper-network was trained on, not up to batch_size times larger.
                share = batch["labels"].shape[0] / self.settings.batch_size
                torch.autograd.grad(share * _answer_nll(logits, batch["labels"][:, -keep:]), weights)
        keys, grads = tracer.keys, tracer.grads
        cached = {name: (keys[name], grads[name]) for name in self.modules}
        if update_normalizers:
            for name, (k, g) in cached.items():
                self.hypernet(name)[0].normalizer.update(torch.cat([k, g], dim=-1))
        return cached

    @torch.no_grad()
    def _key_moments(self, examples: list[dict[str, Any]]) -> tuple[dict[str, Tensor], int]:
        """(E[kkᵀ] per edited module over the key positions (`_key_masks`), number of positions)."""
        sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in self.modules.items()}
        count = 0
        with self._session(), KeyMoments(self.modules, sums) as tracer:
            for batch, tracer.mask in self._key_masks(examples):
                with torch.no_grad():
                    self.model(**model_inputs(dict(batch)), logits_to_keep=1)  # only the keys are wanted
                count += int(tracer.mask.sum())
        if count == 0:
            raise ValueError("no labelled positions to take preserved keys from")
        return {name: (total / count).float() for name, total in sums.items()}, count

    def fit_preservation(self, prompts: Sequence[str], answers: Sequence[str],
                         subjects: Sequence[str | None] | None = None) -> int:
        """Store E[k₀k₀ᵀ] per edited module over the keys predicting `answers` to `prompts` (facts to keep).

        MEMIT's covariance term, on the positions that matter for locality: the key positions of other chat
        questions (where the edits' keys are: answer tokens, with or without the end of turn as
        `key_end_of_turn`, or the `subjects`' last tokens), which share key directions with every edit. Returns
        the number of keys.
        """
        self.preserved, count = self._key_moments(self._edit_pairs(prompts, answers, subjects))
        return count

    def fit_text_preservation(self, texts: Sequence[str]) -> int:
        """Store E[ttᵀ] per edited module over every position of `texts` (general text whose outputs should not
        move: MEMIT's Wikipedia covariance). Returns the number of keys."""
        self.preserved_text, count = self._key_moments(self._texts(texts))
        return count

    def preservation_prior(self, name: str, edit_keys: int) -> Tensor | None:
        """μ·E[k₀k₀ᵀ] + μₜ·E[ttᵀ] of module `name` for a solve over `edit_keys` keys (the weights times
        `edit_keys` when `preserve_units` is "edit_keys"), or None when both preserved-key terms are off."""
        terms = []
        scale = edit_keys if self.settings.preserve_units == "edit_keys" else 1
        for weight, moments, fit in ((self.settings.preserve_weight, self.preserved, "fit_preservation"),
                                     (self.settings.preserve_text_weight, self.preserved_text, "fit_text_preservation")):
            if weight == 0:
                continue
            if name not in moments:
                raise ValueError(f"a preserved-key weight > 0 needs its key moments: call {fit} first")
            terms.append(weight * scale * moments[name].to(self.device))
        return sum(terms) if terms else None

    def _chunks(self, keys: Tensor, grads: Tensor) -> zip:
        return zip(keys.split(self.settings.hyper_chunk), grads.split(self.settings.hyper_chunk), strict=True)

    @torch.no_grad()
    def _solve(self, cached: Cache) -> dict[str, Tensor]:
        """S [in, out] per module; the value differences are computed chunk by chunk, no graph kept."""
        solutions = {}
        for name, (keys, grads) in cached.items():
            net, layer = self.hypernet(name)
            diffs = torch.cat([net.value_diffs(k, g, layer) for k, g in self._chunks(keys, grads)])
            solutions[name] = ridge_solve(keys, diffs, net.log_lambda[layer].exp(),
                                          self.preservation_prior(name, keys.shape[0]))
        return solutions

    @torch.no_grad()
    def compute_deltas(self, records: Sequence[EditRecord]) -> dict[str, Tensor]:
        """`{module: Sᵀ}` (float32, shaped like the weight) writing every record's `target_new` at once.

        With `rounds` > 1 the rounds' shifts (each times `round_step`) are summed, each round solved on the model
        with the earlier rounds' sum applied (the model is restored bit for bit after every round).
        """
        if not records:
            raise ValueError("compute_deltas needs at least one edit record")
        total: dict[str, Tensor] = {}
        for _ in range(self.settings.rounds):
            with EditSet(total).apply(self.model):
                deltas = self._round_deltas(records)
            total = {name: total.get(name, 0) + self.settings.round_step * delta for name, delta in deltas.items()}
        return total

    def _round_deltas(self, records: Sequence[EditRecord]) -> dict[str, Tensor]:
        """One solve on the model as it is. Streamed: each sub-batch of `batch_size` records is traced (frozen
        prefix included), turned into value differences and reduced to its KᵀK and KᵀD at once, so memory does
        not grow with the number of edits."""
        grams: dict[str, Tensor] = {}
        crosses: dict[str, Tensor] = {}
        rows: dict[str, int] = {}
        progress = ProgressLog("malmen: keys and value shifts", len(records))
        for start in range(0, len(records), self.settings.batch_size):
            batch = records[start : start + self.settings.batch_size]
            for name, (keys, grads) in self.cache(batch).items():
                net, layer = self.hypernet(name)
                diffs = torch.cat([net.value_diffs(k, g, layer) for k, g in self._chunks(keys, grads)])
                keys64 = keys.to(torch.float64)
                if name not in grams:
                    grams[name] = keys64.new_zeros(keys64.shape[1], keys64.shape[1])
                    crosses[name] = keys64.new_zeros(keys64.shape[1], diffs.shape[1])
                # In place: a fresh [in, in] float64 sum per sub-batch made the process's memory creep with N.
                grams[name].addmm_(keys64.T, keys64)
                crosses[name].addmm_(keys64.T, diffs.to(torch.float64))
                rows[name] = rows.get(name, 0) + keys64.shape[0]
            progress.update(len(batch))
        deltas = {}
        for name in grams:
            net, layer = self.hypernet(name)
            lam = net.log_lambda[layer].exp()
            prior = self.preservation_prior(name, rows[name])
            deltas[name] = ridge_solve_gram(grams[name], crosses[name], lam, prior).T.contiguous()
        return deltas

    # ---- meta-training ------------------------------------------------------------------------------------------

    def meta_pairs(self, records: Sequence[EditRecord]) -> dict[str, tuple[list[str], list[str]]]:
        """This step's (prompts, answers): `edit`, `gen` (a paraphrase with `target_new`) and `loc` (a locality item).

        The draws depend on the seed and the step count only, so a resumed run repeats an uninterrupted one.
        """
        rng = random.Random(f"{self.settings.seed}:{self.steps}")
        targets = [r["target_new"] for r in records]
        paraphrases = [rng.choice(list(r.get("paraphrases") or [r["prompt"]])) for r in records]
        locality = [rng.choice(list(r["locality"])) for r in records if r.get("locality")]
        return {
            "edit": ([r["prompt"] for r in records], targets),
            "gen": (paraphrases, targets),
            "loc": ([item["prompt"] for item in locality], [item["answer"] for item in locality]),
        }

    def meta_backward(self, records: Sequence[EditRecord], general: Sequence[str] | None = None) -> dict[str, float]:
        """Add this batch's meta-gradient to the hyper-networks' `.grad`; the model is left bit-identical.

        `general`: texts for the retention term (required when `retention_coef` > 0). Returns the losses, ES, GS
        (teacher-forced token accuracy on the edit prompts and paraphrases) and LS (agreement of the edited model's
        argmax with the unedited one's on the locality answers), all measured on this step's edit.
        """
        s = self.settings
        if s.retention_coef > 0 and not general:
            raise ValueError("retention_coef > 0 needs `general` texts for the retention KL")
        pairs = self.meta_pairs(records)
        parts = {"edit": self._edit_pairs(*pairs["edit"], [r.get("subject") for r in records]),
                 "gen": self._pairs(*pairs["gen"]),
                 "loc": self._pairs(*pairs["loc"])}
        retention = self._texts(general) if s.retention_coef > 0 else []
        with self._session() as weights:
            cached = self._cache(parts["edit"], weights, update_normalizers=True)
            solutions = self._solve(cached)
            edit_set = EditSet({name: solution.T for name, solution in solutions.items()})
            weight_grads = [torch.zeros_like(weight, dtype=torch.float32) for weight in weights]

            def run(examples: list[dict[str, Any]], coef: float, kl: bool) -> tuple[float, float]:
                return self._edited_pass(examples, edit_set, weights, weight_grads, coef, kl)

            edit_loss, es = run(parts["edit"], 0.0, kl=False)
            gen_loss, gs = run(parts["gen"], 1.0, kl=False)
            loc_loss, ls = run(parts["loc"], s.loc_coef, kl=True)
            retention_loss, _ = run(retention, s.retention_coef, kl=True)
        solution_grads = {name: grad.T for name, grad in zip(self.modules, weight_grads, strict=True)}
        self._stage_two(cached, solutions, solution_grads)
        return {
            "loss": gen_loss + s.loc_coef * loc_loss + s.retention_coef * retention_loss,
            "gen_loss": gen_loss, "loc_loss": loc_loss, "retention_loss": retention_loss, "edit_loss": edit_loss,
            "es": es, "gs": gs, "ls": ls, "rows": float(next(iter(cached.values()))[0].shape[0]),
            "log_eta": float(torch.cat([net.log_lr.detach() for net in self.nets.values()]).mean()),
            "log_lambda": float(torch.cat([net.log_lambda.detach() for net in self.nets.values()]).mean()),
        }

    def _edited_pass(
        self, examples: list[dict[str, Any]], edit_set: EditSet, weights: list[Tensor], weight_grads: list[Tensor],
        coef: float, kl: bool,
    ) -> tuple[float, float]:
        """(loss summed over sub-batches, mean per-example score) of the edited model; coef·∂loss/∂W is accumulated.

        kl=False: answer NLL and token accuracy; kl=True: KL(pre ‖ post) and agreement with the unedited model,
        whose logits are taken per sub-batch before the edit is applied (no logits are kept across sub-batches).
        """
        total, scores = 0.0, []
        for batch in self._batches(examples):
            keep = answer_window(batch["labels"])  # the vocabulary projection runs on the answer window only
            labels = batch["labels"][:, -keep:]
            with torch.no_grad():
                pre = self._logits(batch, keep) if kl else None
            with edit_set.apply(self.model), torch.set_grad_enabled(coef > 0):
                post = self._logits(batch, keep)
                loss = _kl(pre, post, labels) if kl else _answer_nll(post, labels)
                if coef > 0:
                    for acc, grad in zip(weight_grads, torch.autograd.grad(coef * loss, weights), strict=True):
                        acc += grad.float()
            predictions, targets, mask = _predictions(post.detach(), labels)
            reference = _predictions(pre, labels)[0] if kl else None
            scores.append(agreement(predictions, reference, mask) if kl else token_accuracy(predictions, targets, mask))
            total += float(loss.detach())
        return total, float(torch.cat(scores).mean()) if scores else float("nan")

    def _stage_two(self, cached: Cache, solutions: dict[str, Tensor], solution_grads: dict[str, Tensor]) -> None:
        """Push G = ∂L/∂S through the ridge solve to log λ and, chunk by chunk, through the hyper-network."""
        for name, (keys, grads) in cached.items():
            net, layer = self.hypernet(name)
            lam = net.log_lambda[layer].exp()
            diff_grads, lam_grad = ridge_backward(keys, lam, solutions[name], solution_grads[name],
                                                  self.preservation_prior(name, keys.shape[0]))
            (lam_grad * lam.detach() * net.log_lambda[layer]).backward()  # ∂L/∂log λ = λ·∂L/∂λ
            for (k, g), diff_grad in zip(self._chunks(keys, grads), diff_grads.split(self.settings.hyper_chunk), strict=True):
                (diff_grad * net.value_diffs(k, g, layer)).sum().backward()

    @property
    def optimizer(self) -> torch.optim.Adam:
        """Adam over the hyper-networks: `meta_lr` for the blocks, `scalar_lr` for the per-layer log η and log λ."""
        if self._optimizer is None:
            scalars = [param for net in self.nets.values() for param in (net.log_lr, net.log_lambda)]
            ids = {id(param) for param in scalars}
            blocks = [param for param in self.nets.parameters() if id(param) not in ids]
            self._optimizer = torch.optim.Adam([
                {"params": blocks, "lr": self.settings.meta_lr},
                {"params": scalars, "lr": self.settings.scalar_lr},
            ])
        return self._optimizer

    def meta_step(self, records: Sequence[EditRecord], general: Sequence[str] | None = None) -> dict[str, float]:
        """One meta-training step on a batch of records (`meta_backward`, clip, Adam step); returns its stats."""
        optimizer = self.optimizer
        optimizer.zero_grad(set_to_none=True)
        stats = self.meta_backward(records, general)
        stats["grad_norm"] = float(nn.utils.clip_grad_norm_(self.nets.parameters(), self.settings.max_grad_norm))
        optimizer.step()
        self.steps += 1
        return stats

    # ---- persistence --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Tensor]:
        """Flat tensors: `nets.*` (weights and normalisers), `optimizer.{param}.{slot}` (Adam), `steps`, and
        `preserved.{module}` / `preserved_text.{module}` (the preserved-key moments, when fitted)."""
        state = {f"nets.{key}": value.detach().clone() for key, value in self.nets.state_dict().items()}
        state.update({f"preserved.{name}": moment.clone() for name, moment in self.preserved.items()})
        state.update({f"preserved_text.{name}": moment.clone() for name, moment in self.preserved_text.items()})
        state["steps"] = torch.tensor(self.steps)
        if self._optimizer is not None:
            for index, slots in self._optimizer.state_dict()["state"].items():
                for slot, value in slots.items():
                    state[f"optimizer.{index}.{slot}"] = torch.as_tensor(value).clone()
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore what `state_dict` saved (the optimizer's learning rates come from the current settings)."""
        unknown = sorted(key for key in state
                         if not key.startswith(("nets.", "optimizer.", "preserved.", "preserved_text.")) and key != "steps")
        if unknown:
            raise ValueError(f"not a MALMEN editor state: unexpected keys {unknown[:5]}")
        try:
            self.nets.load_state_dict({key[5:]: value for key, value in state.items() if key.startswith("nets.")})
        except RuntimeError as error:
            raise ValueError(f"MALMEN state does not fit this model and these settings: {error}") from error
        self.steps = int(state["steps"]) if "steps" in state else 0
        moments = {}
        for prefix in ("preserved.", "preserved_text."):
            moments[prefix] = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
            if set(moments[prefix]) - set(self.modules):
                raise ValueError(f"preserved-key moments for modules this editor does not edit: "
                                 f"{sorted(set(moments[prefix]) - set(self.modules))[:3]}")
        self.preserved, self.preserved_text = moments["preserved."], moments["preserved_text."]
        slots: dict[int, dict[str, Tensor]] = {}
        for key, value in state.items():
            if key.startswith("optimizer."):
                _, index, slot = key.split(".", 2)
                slots.setdefault(int(index), {})[slot] = value
        self._optimizer = None
        if slots:
            saved = self.optimizer.state_dict()
            self.optimizer.load_state_dict({"state": slots, "param_groups": saved["param_groups"]})
