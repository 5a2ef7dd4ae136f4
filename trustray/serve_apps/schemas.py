"""Request models and the error type of the OpenAI-compatible API (plain pydantic, no Ray).

Unknown request fields are ignored, as OpenAI-compatible servers commonly do, so clients that send optional
fields this server does not implement still work; fields whose values cannot be honoured (n > 1, a non-text
content part, an unsupported role) are rejected with a 400.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(status, message, type, param, code)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def __reduce__(self):
        # Keyword-only arguments would be lost by the default pickling of exceptions (sent between replicas).
        return (_rebuild_api_error, (self.status, self.message, self.type, self.param, self.code))

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _rebuild_api_error(status: int, message: str, type: str, param: str | None, code: str | None) -> APIError:
    return APIError(status, message, type=type, param=param, code=code)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class TextPart(BaseModel):
    type: Literal["text"] = Field(..., description="Only text content parts are supported.")
    text: str = Field(..., description="The text of this part.")


class ChatMessage(_Request):
    # `developer` is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"] = Field(..., description="Author of the message.")
    content: str | list[TextPart] | None = Field(..., description="Text, or a list of text parts.")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_engine_message(self) -> dict[str, str]:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="Send a last chunk holding the token usage.")


class _SamplingRequest(_Request):
    model: str = Field(..., min_length=1, description="Public model name (see /v1/models).")
    max_tokens: int | None = Field(None, ge=1, description="Most new tokens; the server default when omitted.")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 decodes greedily.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stop: str | list[str] | None = Field(
        None, validate_default=True, description="Up to 4 strings that end generation (read as a list)."
    )
    seed: int | None = Field(None, description="Sampling seed.")
    stream: bool = Field(False, description="Answer as server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options.")
    n: int = Field(1, description="Number of choices; only 1 is supported.")

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [] if value is None else [value] if isinstance(value, str) else list(value)
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are supported")
        return stops

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class SelectiveOptions(BaseModel):
    """Ask for an abstention instead of a doubtful answer (needs the server's reward model)."""

    model_config = ConfigDict(extra="forbid")

    max_risk: float | None = Field(None, ge=0, le=1, description="Largest acceptable share of bad answers among "
                                   "those given; the reward threshold comes from the reward model's calibration.")
    threshold: float | None = Field(None, description="Answer only when the reward model scores at least this.")

    @model_validator(mode="after")
    def _exactly_one(self) -> SelectiveOptions:
        if (self.max_risk is None) == (self.threshold is None):
            raise ValueError("give exactly one of max_risk and threshold")
        return self


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(..., description="The conversation so far.")
    selective: SelectiveOptions | None = Field(None, description="trustray extension: abstain below a reward.")


class RewardsRequest(BaseModel):
    """Body of POST /v1/rewards: a prompt (text or chat messages) and the responses to score."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | list[ChatMessage] = Field(..., description="The prompt the responses answer.")
    responses: list[str] = Field(..., min_length=1, max_length=32, description="Responses to score.")

    def messages(self) -> list[dict[str, str]]:
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [message.as_engine_message() for message in self.prompt]


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] = Field(..., description="A prompt, or a list holding exactly one prompt.")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("give one prompt (a string or a list of one string)")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class LocalityProbe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    answer: str = Field(min_length=1)


class EditItem(BaseModel):
    """One fact to write: the question, the new answer, optional paraphrases and locality probes."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=2000)
    target_new: str = Field(min_length=1, max_length=500)
    subject: str | None = None
    target_true: str | None = None
    paraphrases: list[str] = Field(default_factory=list, max_length=32)
    locality: list[LocalityProbe] = Field(default_factory=list, max_length=32)

    def record(self, index: int) -> dict[str, Any]:
        """The edit record editors and metrics read (`trustray.data.edits` shape)."""
        return {
            "id": f"request-{index}", "subject": self.subject or "", "prompt": self.prompt,
            "target_true": self.target_true or "", "target_new": self.target_new,
            "paraphrases": self.paraphrases or [self.prompt],
            "locality": [probe.model_dump() for probe in self.locality],
        }


class EditsRequest(BaseModel):
    """Body of POST /v1/edits."""

    model_config = ConfigDict(extra="forbid")

    edits: list[EditItem] = Field(min_length=1)
    name: str | None = Field(None, max_length=200, description="A label kept in the edit set's metadata.")
    wait: bool = Field(
        True, description="Answer when the edit set is ready (200). False: answer at once (202, status "
        "'running') and poll GET /v1/edits/{id} until 'succeeded', 'rejected' or 'failed'.",
    )
    accept_locality_loss: bool = Field(
        False, description="Serve the edit set even when it keeps fewer unrelated answers than the server's "
        "min_locality_kept (otherwise it is rejected and not served).",
    )
