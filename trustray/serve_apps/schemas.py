"""Request and response models and the error type of the OpenAI-compatible API (plain pydantic, no Ray).

Unknown request fields are ignored, as OpenAI-compatible servers commonly do, so clients that send metadata this
server has no use for (`user`, `store`, `metadata`) still work. OpenAI parameters that would change the answer and
that this server does not implement (`logprobs`, `tools`, `response_format` other than text, penalties...) are
declared, and rejected with a 400 naming the parameter unless they hold their "off" value; so are values that
cannot be honoured (n > 1, a non-text content part, an unsupported role). Text holding a lone UTF-16 surrogate
(JSON's `"\ud800"`, which no UTF-8 tokenizer can encode) is a 400 too. The response models document the answers
in the OpenAPI schema (`/docs`) and let schema-based fuzzers check them.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


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


def lone_surrogate_at(value: Any, path: tuple[str | int, ...] = ()) -> tuple[str | int, ...] | None:
    """Where in parsed JSON (dicts, lists, strings; keys included) a string holds a lone UTF-16 surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = lone_surrogate_at(key, (*path, str(key)[:40])) or lone_surrogate_at(item, (*path, key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = lone_surrogate_at(item, (*path, index))
            if found is not None:
                return found
    return None


class ValidUnicode(BaseModel):
    """A request body: every string in it must be encodable as UTF-8."""

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        path = lone_surrogate_at(data)
        if path is not None:
            where = ".".join(str(part) for part in path) or "body"
            raise ValueError(f"{where} holds a lone UTF-16 surrogate (such as \\ud800): not valid Unicode text")
        return data


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


def _is_off(value: Any, off: tuple[Any, ...]) -> bool:
    # `bool` is an `int`: `logprobs: 0` is not `false`, yet a penalty of 0.0 is 0.
    return any(value == allowed and (type(value) is type(allowed) or bool not in (type(value), type(allowed)))
               for allowed in off)


def _reject_unless_off(unsupported: dict[str, tuple[Any, ...]], value: Any, info: ValidationInfo) -> Any:
    if value is not None and not _is_off(value, unsupported[info.field_name]):
        allowed = " or ".join(json.dumps(option) for option in unsupported[info.field_name])
        raise ValueError(f"{info.field_name} is not supported by this server (leave it out{', or send ' + allowed if allowed else ''})")
    return value


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


class _SamplingRequest(ValidUnicode, _Request):
    model: str = Field(..., min_length=1, description="Public model name (see /v1/models).")
    max_tokens: int | None = Field(None, ge=1, description="Most new tokens; the server default when omitted.")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 decodes greedily.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stop: str | list[str] | None = Field(
        None, validate_default=True, description="Up to 4 strings that end generation (read as a list)."
    )
    seed: int | None = Field(None, ge=-(2**63), lt=2**63, description="Sampling seed (a 64-bit integer).")
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


_UNSUPPORTED = "Not supported: a 400 unless left out or off."
# OpenAI parameters that change the answer and are not implemented, with the values that mean "off".
CHAT_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (False,), "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none",), "functions": ([],),
    "function_call": ("none",), "response_format": ({"type": "text"},), "logit_bias": ({},),
    "presence_penalty": (0,), "frequency_penalty": (0,), "modalities": (["text"],), "audio": (),
    "prediction": (), "web_search_options": (),
}
COMPLETION_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (0, False), "echo": (False,), "best_of": (1,), "suffix": ("",), "logit_bias": ({},),
    "presence_penalty": (0,), "frequency_penalty": (0,),
}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(..., description="The conversation so far.")
    selective: SelectiveOptions | None = Field(None, description="trustray extension: abstain below a reward.")
    logprobs: Any = Field(None, description=_UNSUPPORTED)
    top_logprobs: Any = Field(None, description=_UNSUPPORTED)
    tools: Any = Field(None, description=_UNSUPPORTED)
    tool_choice: Any = Field(None, description=_UNSUPPORTED)
    functions: Any = Field(None, description=_UNSUPPORTED)
    function_call: Any = Field(None, description=_UNSUPPORTED)
    response_format: Any = Field(None, description=_UNSUPPORTED + " Only {\"type\": \"text\"}.")
    logit_bias: Any = Field(None, description=_UNSUPPORTED)
    presence_penalty: Any = Field(None, description=_UNSUPPORTED)
    frequency_penalty: Any = Field(None, description=_UNSUPPORTED)
    modalities: Any = Field(None, description=_UNSUPPORTED + " Only [\"text\"].")
    audio: Any = Field(None, description=_UNSUPPORTED)
    prediction: Any = Field(None, description=_UNSUPPORTED)
    web_search_options: Any = Field(None, description=_UNSUPPORTED)

    @field_validator(*CHAT_UNSUPPORTED)
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _reject_unless_off(CHAT_UNSUPPORTED, value, info)


class RewardsRequest(ValidUnicode):
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
    logprobs: Any = Field(None, description=_UNSUPPORTED)
    echo: Any = Field(None, description=_UNSUPPORTED)
    best_of: Any = Field(None, description=_UNSUPPORTED)
    suffix: Any = Field(None, description=_UNSUPPORTED)
    logit_bias: Any = Field(None, description=_UNSUPPORTED)
    presence_penalty: Any = Field(None, description=_UNSUPPORTED)
    frequency_penalty: Any = Field(None, description=_UNSUPPORTED)

    @field_validator(*COMPLETION_UNSUPPORTED)
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _reject_unless_off(COMPLETION_UNSUPPORTED, value, info)

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


class EditsRequest(ValidUnicode):
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


# -- answers (documentation: the handlers build these payloads as dicts) ----------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error: 4xx for a request that cannot be answered, 5xx for a server fault."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    context_tokens: int | None = Field(None, ge=0, description="trustray extension (RAG): tokens of the passages.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None


class Source(BaseModel):
    id: str
    title: str
    score: float


class RetrievalSetting(BaseModel):
    """How the RAG model built this answer's context (the configured setting, the same for every request)."""

    retriever: Literal["dense"] = Field(description="Retrieval method.")
    index: str = Field(description="Name of the passage index folder.")
    embedder: str = Field(description="Embedder of the questions and the index.")
    top_k: int = Field(description="Passages retrieved.")
    compressor: str | None = Field(description="The compressor the passages went through (None: uncompressed).")
    budget: int | None = Field(description="The compressor's context-token budget.")


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    sources: list[Source] | None = Field(None, description="trustray extension (RAG): the retrieved passages.")
    compression: dict[str, Any] | None = Field(None, description="trustray extension (RAG): the compressed "
                                               "context and its token counts.")
    retrieval: RetrievalSetting | None = Field(None, description="trustray extension (RAG): the retrieval setting "
                                               "that made the context.")
    selective: dict[str, Any] | None = Field(None, description="trustray extension: the reward and whether the "
                                             "answer was withheld.")
    system_fingerprint: str | None = Field(None, description="The published adapter version that answered.")


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None


class TextCompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]
