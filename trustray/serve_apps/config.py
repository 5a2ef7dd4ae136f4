"""Configuration of the OpenAI-compatible Serve application.

What is served (`chat`, `rag`) and the request limits are kept apart from how it is deployed
(`deployments`: per-deployment resources and autoscaling), so one app config runs on a laptop and a cluster.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from trustray.actors.compressor import CompressorConfig
from trustray.config import ActorResources, BaseConfig
from trustray.models.embedders import EmbedderConfig
from trustray.models.engines import EngineConfig
from trustray.models.sources import DEFAULT_CHAT_MODEL


class AutoscalingOptions(BaseConfig):
    """Replica count policy of one deployment (algorithm settings of the autoscaler, not resources)."""

    min_replicas: int = Field(1, ge=1, description="Replicas kept running at all times.")
    max_replicas: int = Field(1, ge=1, description="Most replicas; equal to min_replicas gives a fixed count.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Ongoing requests per replica the autoscaler aims for (used when max > min)."
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="How long the load must stay above the target before a "
                                   "replica is added (Serve's default).")
    downscale_delay_s: float = Field(600.0, ge=0, description="How long the load must stay below the target before "
                                     "a replica is removed (Serve's default).")

    @model_validator(mode="after")
    def _check_range(self) -> AutoscalingOptions:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class DeploymentOptions(BaseConfig):
    """How one Serve deployment runs: resources per replica, replica autoscaling and admission limit."""

    resources: ActorResources = Field(
        default_factory=lambda: ActorResources(num_cpus=0.25),
        description="Ray resources per replica (fractional CPUs keep small machines from starving); torch_threads "
        "pins the replica's torch threads (a chat engine's or embedder's own torch_threads applies after it).",
    )
    autoscaling: AutoscalingOptions = Field(
        default_factory=AutoscalingOptions, description="Replica count bounds and autoscaling target."
    )
    max_ongoing_requests: int = Field(
        32, ge=1, description="Requests one replica accepts at once; more wait in the caller's queue."
    )

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options(...)`."""
        options: dict[str, Any] = {
            "ray_actor_options": self.resources.ray_options(),
            "max_ongoing_requests": self.max_ongoing_requests,
        }
        scaling = self.autoscaling
        if scaling.max_replicas == scaling.min_replicas:
            options["num_replicas"] = scaling.min_replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": scaling.min_replicas,
                "max_replicas": scaling.max_replicas,
                "target_ongoing_requests": scaling.target_ongoing_requests,
                "upscale_delay_s": scaling.upscale_delay_s,
                "downscale_delay_s": scaling.downscale_delay_s,
            }
        return options


class DeploymentsConfig(BaseConfig):
    """Options of each deployment in the application."""

    chat: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(resources=ActorResources(num_cpus=0.5), max_ongoing_requests=16),
        description="The replicas hosting the chat model engine.",
    )
    retriever: DeploymentOptions = Field(
        default_factory=DeploymentOptions, description="The replicas hosting the embedder and passage index."
    )
    compressor: DeploymentOptions = Field(
        default_factory=DeploymentOptions,
        description="The replicas running the passage compressor (rag.compressor), scaled apart from the chat model.",
    )
    editor: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(resources=ActorResources(num_cpus=0.25), max_ongoing_requests=4),
        description="The replicas running the editor for POST /v1/edits (each holds a copy of the base model).",
    )
    reward: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(resources=ActorResources(num_cpus=0.25), max_ongoing_requests=16),
        description="The replicas hosting the reward model (each holds a copy of its frozen backbone).",
    )
    ingress: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(max_ongoing_requests=128),
        description="The FastAPI replicas parsing and validating HTTP requests.",
    )


class RagServeConfig(BaseConfig):
    """Retrieval-augmented model exposed next to the chat model under its own public name."""

    model_name: str = Field("rag", min_length=1, description="Public model name that selects retrieval.")
    index_dir: str = Field(..., description="Passage index folder (index.faiss, passages.parquet, metadata.json).")
    embedder: EmbedderConfig = Field(
        default_factory=EmbedderConfig, description="Embedder of the questions; must be the one that built the index."
    )
    top_k: int = Field(3, ge=1, le=50, description="Passages retrieved and put in the prompt per question.")
    compressor: CompressorConfig | None = Field(
        None, description="Compress the retrieved passages under a token budget before generation (None: the whole "
        "top-k goes to the chat model). Responses then carry the compressed context and the token counts.",
    )


class EditServeConfig(BaseConfig):
    """Edit sets served next to the base model, and the `/v1/edits` API that creates them."""

    store_dir: str = Field(
        "outputs/edit_sets/served",
        description="Folder of the served edit sets (one subfolder per id); shared storage on a multi-node cluster.",
    )
    api_key: str | None = Field(
        None, description="Key `/v1/edits` requires as `Authorization: Bearer <key>`; None: every call gets 401."
    )
    api_key_env: str | None = Field(
        "TRUSTRAY_EDIT_API_KEY", description="Environment variable read for the key when `api_key` is not set."
    )
    model_prefix: str = Field("edit-", min_length=1, description="Public model name of an edit set: prefix + id.")
    editor: str = Field(
        "memit", description="Editor run by POST /v1/edits (a name from the editor registry; memit, scoped to its "
        "edit keys, keeps the most unrelated answers on the embedded default, benchmarks/served_edit_locality.py).",
    )
    editor_dir: str | None = Field(None, description="Meta-trained editor folder (for malmen / mend).")
    editor_settings: dict[str, Any] = Field(default_factory=dict, description="Settings of a baseline editor.")
    max_edits_per_request: int = Field(1024, ge=1, description="Most edits one POST /v1/edits may carry.")
    job_timeout_s: float = Field(
        30.0, gt=0, description="A job whose editor has not signalled it is alive for this long (the replica died) is "
        "reported failed; the editor signals every few seconds while it works.",
    )
    min_locality_kept: float = Field(
        0.95, ge=0, description="Fraction of the locality probes whose greedy answer an edit set must keep to be "
        "served; below it the edit set is rejected unless the request sets accept_locality_loss (above 1: every "
        "edit set is rejected).",
    )
    locality_probes: int = Field(
        50, ge=1, description="Unrelated questions of the locality check (`trustray.data.edits."
        "locality_probe_questions`); the unedited model's answers are taken once per editor replica.",
    )
    locality_max_new_tokens: int = Field(16, ge=1, description="Greedy tokens per locality probe answer.")
    anchors_per_edit: int = Field(
        4, ge=0, description="Default locality anchors (train-split locality probes, never a check probe) given to an "
        "editor held to locality (ft_kl) for every edit that brings none.",
    )
    replay_texts: int = Field(
        64, ge=0, description="Wikipedia intros outside the edit evaluation's pool replayed by an editor that takes "
        "general text (ft_kl; memit's preserved keys) when its editor_settings give none.",
    )
    preserved_chats: int = Field(
        1000, ge=0, description="Default locality anchors whose conversations are preserved keys of an editor that "
        "takes them (memit) when its editor_settings give none.",
    )

    def scoped(self) -> bool:
        """Whether the editor makes scoped edit sets (`trustray.core.editing.scope`), which need the hf engine."""
        from trustray.core.editing.factory import registered_editor

        settings = registered_editor(self.editor).Settings.model_validate(self.editor_settings)
        return getattr(settings, "scope_threshold", None) is not None

    def resolved_api_key(self) -> str | None:
        import os

        return self.api_key or (os.environ.get(self.api_key_env) if self.api_key_env else None)


class RewardServeConfig(BaseConfig):
    """A reward model (`trustray run active_preference` writes one per round) behind /v1/rewards and selective
    answers."""

    model_dir: str = Field(..., description="A reward model folder, e.g. outputs/active_preference/cpu/rounds/"
                           "labels-64/reward_model.")
    refusal: str = Field("I am not confident enough in an answer to this.", min_length=1,
                         description="What a selective request gets instead of an answer scored below the threshold.")


class AdapterServeConfig(BaseConfig):
    """LoRA adapters published to a folder (`trustray.data.adapter_store`; the preference loop publishes its policy
    there with `publish.store_dir`), each served as the model of its name. A newly published version is served
    from the next request on, without a restart: each chat replica loads it when first asked for it."""

    store_dir: str = Field(..., description="The adapter store folder (shared storage on a multi-node cluster).")


class LimitsConfig(BaseConfig):
    """Bounds on what one HTTP request may ask for; beyond them the request gets a 4xx error."""

    max_tokens: int = Field(1024, ge=1, le=4096, description="Largest accepted `max_tokens`.")
    default_max_tokens: int = Field(256, ge=1, le=4096, description="`max_tokens` used when a request omits it.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest accepted request body, in bytes (413 above).")
    max_messages: int = Field(256, ge=1, description="Most chat messages in one request.")
    request_timeout_s: float = Field(
        600.0, gt=0, description="A request still unanswered after this long gets a 504 JSON error."
    )

    @model_validator(mode="after")
    def _check_default(self) -> LimitsConfig:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("default_max_tokens must not exceed max_tokens")
        return self


class ServeConfig(BaseConfig):
    """The OpenAI-compatible application: chat model, optional RAG model, limits and deployment options."""

    host: str = Field("127.0.0.1", description="Address the Serve HTTP proxy binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the Serve HTTP proxy.")
    model_name: str = Field(
        DEFAULT_CHAT_MODEL, min_length=1, description="Public name of the chat model in `/v1/models` and requests."
    )
    chat: EngineConfig = Field(default_factory=EngineConfig, description="The chat model served and its engine.")
    rag: RagServeConfig | None = Field(None, description="Retrieval-augmented model; None serves chat only.")
    edits: EditServeConfig | None = Field(None, description="Edit sets and the /v1/edits API; None: disabled.")
    adapters: AdapterServeConfig | None = Field(None, description="Published LoRA adapters served by name; None: "
                                                "disabled.")
    reward: RewardServeConfig | None = Field(None, description="Reward model for /v1/rewards and `selective`; None: "
                                             "disabled.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Per-request bounds.")
    batch_max_size: int = Field(
        8, ge=1, description="Most concurrent non-streaming requests the chat deployment generates in one call."
    )
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, description="How long a chat replica waits for more requests to fill a batch."
    )
    deployments: DeploymentsConfig = Field(
        default_factory=DeploymentsConfig, description="Resources and autoscaling of each deployment."
    )

    def served_names(self) -> list[str]:
        """Public names of the models always served: the chat model, then the RAG model when configured."""
        return [self.model_name] + ([self.rag.model_name] if self.rag else [])

    @model_validator(mode="after")
    def _check_names(self) -> ServeConfig:
        if self.rag is not None and self.rag.model_name == self.model_name:
            raise ValueError(f"rag.model_name and model_name are both {self.model_name!r}; give them distinct names")
        if self.edits is not None and self.chat.engine == "vllm" and self.edits.scoped():
            raise ValueError(f"edits.editor {self.edits.editor!r} makes scoped edit sets, which only the hf engine "
                             f"applies (chat.engine is {self.chat.engine!r}); use chat.engine=hf, or set "
                             "edits.editor_settings.scope_threshold=null for plain weight changes")
        return self
