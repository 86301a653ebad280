"""Request models of the OpenAI and Anthropic APIs (pydantic 2) and the error bodies of each API.

Design choices:
- Only requests are modelled. Responses and stream events are plain dicts built in `openai_api.py` /
  `anthropic_api.py`: they are written once per token, and a dict is both faster and easier to compare
  with the published wire format than a model round trip.
- Requests are validated in strict mode (a string where a number belongs is an error, as on the real
  APIs; integers are still accepted for floats) and unknown fields are allowed and ignored, so newer
  clients that send fields we do not know (`store`, `metadata`, `cache_control`, betas...) keep working.
  Fields whose value we cannot honour (n > 1, image parts, logprobs, structured output) are rejected
  with a 400 that names them rather than silently ignored.
- Values are bounded where the engine has limits: `seed` within what torch generators take
  ([-2**63, 2**64 - 1]), `logit_bias` values within OpenAI's [-100, 100] (finite), a tool schema's
  `properties` an object of schema objects (in `count_tokens` too, so it agrees with `messages`).
- Roles and content-block types are closed sets (`Literal` / discriminated unions), so an unknown role or
  block type is a 400 that lists the allowed values.
- `APIError` carries an HTTP status and a message; `openai_error_body` / `anthropic_error_body` render it
  in each API's shape (`{"error": {"message", "type", "param", "code"}}` and `{"type": "error", "error":
  {"type", "message"}}`), and `validation_message` turns pydantic errors into one readable line such as
  `messages.0.role: Input should be 'system', 'developer', 'user', 'assistant' or 'tool'`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

# ----------------------------------------------------------------------------------------- errors

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}


class APIError(Exception):
    """An error to return to the client: HTTP status, message, optional OpenAI `param` / `code`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def openai_error_body(err: APIError) -> dict[str, Any]:
    return {
        "error": {
            "message": err.message,
            "type": _OPENAI_TYPES.get(
                err.status, "server_error" if err.status >= 500 else "invalid_request_error"
            ),
            "param": err.param,
            "code": err.code,
        }
    }


def anthropic_error_body(err: APIError) -> dict[str, Any]:
    kind = _ANTHROPIC_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """(one-line message, dotted location of the first error) for a pydantic error."""
    parts = []
    first_loc: str | None = None
    for err in e.errors(include_url=False)[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        if first_loc is None and loc:
            first_loc = loc
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    more = len(e.errors()) - len(parts)
    msg = "; ".join(parts) + (f" (and {more} more errors)" if more > 0 else "")
    return msg, first_loc


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


def _check_schema(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """A tool's JSON schema: `properties`, when given, maps names to schema objects."""
    if schema is None or "properties" not in schema:
        return schema
    props = schema["properties"]
    if not isinstance(props, dict):
        raise ValueError(f"'properties' must be an object (name -> JSON schema), got {type(props).__name__}")
    bad = [k for k, v in props.items() if not isinstance(v, dict)]
    if bad:
        raise ValueError(f"'properties.{bad[0]}' must be a JSON schema object")
    return schema


ToolSchema = Annotated[dict[str, Any] | None, AfterValidator(_check_schema)]
# torch.Generator.manual_seed accepts exactly this range (negative seeds wrap around)
Seed = Annotated[int | None, Field(default=None, ge=-(2**63), le=2**64 - 1)]
LOGIT_BIAS_LIMIT = 100.0  # OpenAI: biases are in [-100, 100]


# ------------------------------------------------------------------------------------------ OpenAI


class OAIContentPart(_Request):
    type: str
    text: str | None = None


class OAIFunctionCall(_Request):
    name: str
    arguments: str | dict[str, Any] = "{}"  # a JSON string per the API; LongCat also accepts a dict


class OAIToolCall(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: OAIFunctionCall


class OAIMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[OAIContentPart] | None = None
    name: str | None = None
    tool_calls: list[OAIToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class OAIFunctionDef(_Request):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: ToolSchema = None
    strict: bool | None = None


class OAITool(_Request):
    type: Literal["function"] = "function"
    function: OAIFunctionDef


class OAINamedFunction(_Request):
    name: str


class OAINamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: OAINamedFunction


class OAIStreamOptions(_Request):
    include_usage: bool = False


class ThinkingConfig(_Request):
    """LongCat's `thinking: {"type": "enabled" | "disabled"}` (also Anthropic's, with `budget_tokens`)."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=0)


class OAIResponseFormat(_Request):
    type: str


class _SamplingFields(_Request):
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    seed: Seed = None
    logit_bias: (
        dict[str, Annotated[float, Field(ge=-LOGIT_BIAS_LIMIT, le=LOGIT_BIAS_LIMIT, allow_inf_nan=False)]]
        | None
    ) = None  # token id (as a string key) → bias; the ids are checked against the vocabulary by the handler
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None  # vLLM extension (benchmarks)
    n: int | None = Field(default=None, ge=1)
    stream: bool | None = False
    stream_options: OAIStreamOptions | None = None
    user: str | None = None


class ChatCompletionRequest(_SamplingFields):
    model: str
    messages: list[OAIMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[OAITool] | None = None
    tool_choice: Literal["none", "auto", "required"] | OAINamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    thinking: ThinkingConfig | bool | None = None
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: OAIResponseFormat | None = None


class CompletionRequest(_SamplingFields):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=1)
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None


# --------------------------------------------------------------------------------------- Anthropic


class ATextBlock(_Request):
    type: Literal["text"]
    text: str


class AImageBlock(_Request):
    type: Literal["image"]
    source: dict[str, Any] | None = None


class ADocumentBlock(_Request):
    type: Literal["document"]
    source: dict[str, Any] | None = None


class AToolUseBlock(_Request):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class AToolResultBlock(_Request):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ATextBlock | AImageBlock] | None = None
    is_error: bool | None = None


class AThinkingBlock(_Request):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class ARedactedThinkingBlock(_Request):
    type: Literal["redacted_thinking"]
    data: str


AContentBlock = Annotated[
    ATextBlock
    | AImageBlock
    | ADocumentBlock
    | AToolUseBlock
    | AToolResultBlock
    | AThinkingBlock
    | ARedactedThinkingBlock,
    Field(discriminator="type"),
]


class AMessage(_Request):
    role: Literal["user", "assistant", "system"]  # agents (Claude Code) send system turns mid-conversation
    content: str | list[AContentBlock]


class ATool(_Request):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: ToolSchema = None
    type: str | None = None  # "custom" or absent; server tools (web_search_...) are rejected


class AToolChoice(_Request):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class _MessagesBase(_Request):
    model: str
    messages: list[AMessage] = Field(min_length=1)
    system: str | list[ATextBlock] | None = None
    tools: list[ATool] | None = None
    tool_choice: AToolChoice | None = None
    thinking: ThinkingConfig | None = None


class MessagesRequest(_MessagesBase):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None
    seed: Seed = None  # not in Anthropic's API; accepted for reproducible tests


class CountTokensRequest(_MessagesBase):
    pass
