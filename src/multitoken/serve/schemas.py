"""Request bodies of the OpenAI-compatible endpoints (pydantic), and the error body.

Fields are OpenAI's; `top_k` is the usual extension (vLLM, TGI: the `openai` client sends it
with `extra_body`), and so is `return_token_ids` (vLLM's: the token ids beside the text). Unknown fields are ignored, as OpenAI-compatible servers do; fields we do
not implement with a value that would change the output (`logprobs`, `echo`, `best_of` > n,
`suffix`, penalties, `logit_bias`, `tools`) are refused with a 400 that names them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, description="-1 or 0: off")
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16)
    # an extension (vLLM's name): each choice / stream chunk also carries the token ids it
    # adds, so a client can check that no token was lost or sent twice (`bench serve`)
    return_token_ids: bool = False
    # accepted only at the values that change nothing
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    user: str | None = None

    def unsupported(self) -> list[str]:
        bad = []
        if self.frequency_penalty:
            bad.append("frequency_penalty")
        if self.presence_penalty:
            bad.append("presence_penalty")
        if self.logit_bias:
            bad.append("logit_bias")
        if self.logprobs not in (None, False, 0):
            bad.append("logprobs")
        return bad


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if self.echo:
            bad.append("echo")
        if self.best_of is not None and self.best_of != self.n:
            bad.append("best_of")
        if self.suffix:
            bad.append("suffix")
        return bad


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The content as text (a list of parts: its text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(p["text"])
        return "".join(parts)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if self.tools:
            bad.append("tools")
        return bad


def error_body(message: str, type_: str, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
