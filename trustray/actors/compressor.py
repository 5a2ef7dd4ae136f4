"""The passage compressor as a service: a `trustray.core.rag.compress` compressor with the chat model's token counter.

`PassageCompressor` is the plain class (the Serve compressor deployment wraps it); `start_compressor_actor` hosts it
as a Ray actor that scales separately from the chat model (`trustray eval rag`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field

from trustray.config import ActorResources, BaseConfig
from trustray.core.rag.compress import Compressed
from trustray.models.embedders import EmbedderConfig


class CompressorConfig(BaseConfig):
    """Which compressor runs, under what budget (algorithm settings; resources are configured apart)."""

    name: str = Field("extractive", description="A name from trustray.core.rag.compress.COMPRESSORS (none, truncate, "
                      "extractive, abstractive).")
    label: str | None = Field(None, description="Name in evaluation tables (default: name, +lsr with a scorer_dir).")
    budget: int = Field(128, ge=1, description="Most context tokens sent to the chat model (its own tokenizer, on the "
                        "passages as the prompt formats them).")
    scorer_dir: str | None = Field(
        None, description="A trained sentence scorer (`compressor_train`'s output_dir/compressor) for `extractive`; "
        "None: the embedder's cosine similarity only (untrained, never keeps nothing).",
    )
    embedder: EmbedderConfig = Field(
        default_factory=EmbedderConfig, description="The embedder the scorer starts from (a trained scorer made from "
        "another one is refused).",
    )
    gamma: float = Field(0.05, gt=0, description="Temperature of the untrained scorer's cosine similarities.")
    summarizer_dir: str | None = Field(
        None, description="A trained summarizer (`abstractive_train`'s output_dir/summarizer) for `abstractive`; "
        "None: the chat model itself, untrained (zero-shot, with the summarizer's instruction).",
    )
    summary_tokens: int = Field(64, ge=1, description="Most tokens the untrained summarizer writes (a trained one "
                                "keeps its own setting).")


    def display_name(self) -> str:
        """The label, else the name (+lsr with a trained scorer, +distilled with a trained summarizer)."""
        if self.label:
            return self.label
        if self.scorer_dir:
            return f"{self.name}+lsr"
        return f"{self.name}+distilled" if self.summarizer_dir else self.name


class PassageCompressor:
    """Compress retrieved passages, counting tokens with the chat model's tokenizer."""

    def __init__(self, config: CompressorConfig, chat_model: str, device: str | None = None) -> None:
        from trustray.core.rag.compress import build_compressor
        from trustray.models.loading import load_tokenizer

        self.config = config
        tokenizer = load_tokenizer(chat_model)
        options: dict[str, Any] = {
            "count_tokens": lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
        }
        if config.name == "extractive":
            options["scorer"] = self._scorer(device).score
        elif config.scorer_dir is not None:
            raise ValueError(f"scorer_dir is for the extractive compressor, not {config.name!r}")
        if config.name == "abstractive":
            summarizer = self._summarizer(chat_model, device)
            options["summarize"] = summarizer.summarize
        elif config.summarizer_dir is not None:
            raise ValueError(f"summarizer_dir is for the abstractive compressor, not {config.name!r}")
        self.compressor = build_compressor(config.name, **options)

    def _summarizer(self, chat_model: str, device: str | None) -> Any:
        from trustray.core.rag.abstractive import Summarizer
        from trustray.models.loading import load_causal_lm, load_summarizer, load_tokenizer

        if self.config.summarizer_dir is not None:
            return load_summarizer(self.config.summarizer_dir, device)
        model = load_causal_lm(chat_model, device)
        return Summarizer(model, load_tokenizer(chat_model), max_new_tokens=self.config.summary_tokens)

    def _scorer(self, device: str | None) -> Any:
        from trustray.core.rag.scorer import SentenceScorer
        from trustray.models.loading import resolve_device
        from trustray.models.sources import model_fingerprint, resolve_model_source

        device = str(resolve_device(device))
        if self.config.scorer_dir is not None:
            scorer = SentenceScorer.load(self.config.scorer_dir, model_fingerprint(self.config.embedder.model), device)
        else:
            from sentence_transformers import SentenceTransformer

            encoder = SentenceTransformer(resolve_model_source(self.config.embedder.model), device=device)
            scorer = SentenceScorer(encoder, gamma=self.config.gamma).to(device)
        return scorer.eval()

    def compress(self, question: str, passages: Sequence[tuple[str, str]]) -> Compressed:
        return self.compressor.compress(question, passages, self.config.budget)

    def compress_batch(self, questions: Sequence[str], passage_lists: Sequence[Sequence[tuple[str, str]]]) -> list[Compressed]:
        """Many questions in one call (the abstractive compressor writes their summaries in one generation)."""
        return self.compressor.compress_batch(questions, passage_lists, self.config.budget)


def start_compressor_actor(config: CompressorConfig, chat_model: str, resources: ActorResources | None = None) -> Any:
    """`PassageCompressor` as a Ray actor with its own resources."""
    import ray

    resources = resources or ActorResources(num_cpus=0.5)
    actor = ray.remote(**resources.ray_options())(PassageCompressor)
    return actor.remote(config, chat_model)
