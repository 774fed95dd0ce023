"""The HTTP side: OpenAI-compatible routes over the scheduler (FastAPI).

    POST /v1/completions       prompt: a string, strings, token ids, or lists of token ids
    POST /v1/chat/completions  messages, through the chat template (`serve.text`)
    GET  /v1/models, /health, /metrics (Prometheus text format)

Responses follow the OpenAI API: `choices` with `finish_reason` ("stop" or "length"), `usage`;
`stream: true` sends server-sent events in the chunk format and ends with `data: [DONE]`
(`stream_options.include_usage` adds the usage chunk before it). Errors are OpenAI error objects
with the status code: 400 (malformed JSON, a wrong type, a prompt longer than the context,
max_tokens out of range, an unsupported option), 404 (unknown model or route), 429 (queue full),
503 (shutting down), 500 (a bug: the message, never a traceback). A client that goes away
(stream or not) has its sequences cancelled: the scheduler frees their rows before its next
step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from multitoken.decoding.sampling import Sampling
from multitoken.errors import MultitokenError
from multitoken.serve.metrics import Metrics
from multitoken.serve.scheduler import Draining, Event, QueueFull, Scheduler, Sequence
from multitoken.serve.schemas import ChatRequest, CompletionRequest, error_body
from multitoken.serve.text import ChatTemplate, encode_stop
from multitoken.tokenizer import Tokenizer

MAX_STOPS = 16


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (status, message, type_,
                                                                       code, param)


@dataclass
class ServerState:
    scheduler: Scheduler
    tokenizer: Tokenizer
    model_name: str
    chat: ChatTemplate
    metrics: Metrics
    speculation: str = "off"
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def context(self) -> int:
        return self.scheduler.model.cfg.max_seq_len


# ---------------------------------------------------------------------------------------------
# Turning a request into sequences.


def _sampling(req: BaseModel) -> Sampling:
    t, top_p, top_k = req.temperature, req.top_p, req.top_k  # type: ignore[attr-defined]
    if top_k is not None and top_k < -1:
        raise APIError(400, f"top_k must be -1 or 0 (off) or >= 1, got {top_k}", param="top_k")
    if t == 0.0:
        return Sampling()
    return Sampling(float(t), top_k if top_k and top_k > 0 else None,
                    float(top_p) if top_p < 1.0 else None)


def _check_prompt(state: ServerState, ids: list[int], max_tokens: int | None,
                  default: int | None) -> int:
    """The max_tokens this prompt runs with (checked against the context)."""
    ctx = state.context
    if not ids:
        raise APIError(400, "the prompt is empty: give at least one token", param="prompt")
    vocab = state.scheduler.model.cfg.vocab_size
    if min(ids) < 0 or max(ids) >= vocab:
        raise APIError(400, f"the prompt has token ids outside the vocabulary [0, {vocab})",
                       param="prompt")
    if len(ids) >= ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens, and the "
                       f"prompt has {len(ids)}: no room for a completion.", param="prompt",
                       code="context_length_exceeded")
    room = ctx - len(ids)
    if max_tokens is None:
        return room if default is None else min(default, room)
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    if max_tokens > room:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, "
                       f"you requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, "
                       f"{max_tokens} for the completion); at most {room} fit.",
                       param="max_tokens", code="context_length_exceeded")
    return max_tokens


def _prompts(state: ServerState, prompt: Any) -> list[list[int]]:
    tok = state.tokenizer
    if isinstance(prompt, str):
        return [tok.encode_prompt(prompt)]
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return [tok.encode_prompt(p) for p in prompt]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [list(p) for p in prompt]


def _chat_prompt(state: ServerState, req: ChatRequest) -> list[int]:
    try:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    try:
        text = state.chat.render(messages)
    except MultitokenError as e:
        raise APIError(400, str(e), param="messages") from None
    return state.tokenizer.encode_prompt(text)  # bos first where the model takes one


def _check_common(state: ServerState, req: Any) -> None:
    if req.model is not None and req.model != state.model_name:
        raise APIError(404, f"The model `{req.model}` does not exist; this server serves "
                       f"`{state.model_name}`.", code="model_not_found", param="model")
    bad = req.unsupported()
    if bad:
        raise APIError(400, f"not supported by this server: {', '.join(bad)}", param=bad[0])


def _sequences(state: ServerState, req: Any, prompts: list[list[int]], max_tokens: list[int],
               stops: list[str]) -> list[Sequence]:
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"at most {MAX_STOPS} stop strings, got {len(stops)}", param="stop")
    sampling = _sampling(req)
    stop_ids = frozenset([state.tokenizer.eos_id])
    seqs = []
    for p, mt in zip(prompts, max_tokens):
        for j in range(req.n):
            seed = None if req.seed is None else req.seed + j
            seqs.append(Sequence(p, mt, sampling, seed=seed, stop_ids=stop_ids,
                                 stop_strings=list(stops)))
    return seqs


# ---------------------------------------------------------------------------------------------
# Running sequences and answering.


class _Run:
    """The sequences of one request, their events delivered into the event loop."""

    def __init__(self, state: ServerState, seqs: list[Sequence], request: BaseModel) -> None:
        self.seqs, self.request = seqs, request
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for i, s in enumerate(seqs):
            s.sink = self._sink(loop, i)
        try:
            state.scheduler.submit(seqs)
        except QueueFull as e:
            raise APIError(429, str(e), type_="rate_limit_error", code="queue_full") from None
        except Draining as e:
            raise APIError(503, str(e), type_="server_error", code="shutting_down") from None
        state.metrics.prompt_tokens.inc(sum(len(s.prompt) for s in seqs))
        self.open = len(seqs)

    def _sink(self, loop: asyncio.AbstractEventLoop, i: int) -> Callable[[Event], None]:
        """Called from the scheduler thread: hand the event to the event loop (gone when the
        server has stopped: then nobody is waiting for it)."""

        def sink(e: Event) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.queue.put_nowait, (i, e))

        return sink

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        while self.open:
            i, e = await self.queue.get()
            if e.finish_reason is not None:
                self.open -= 1
            yield i, e

    def cancel(self) -> None:
        for s in self.seqs:
            s.cancel()


def _usage(prompts: list[list[int]], completion: int) -> dict[str, int]:
    p = sum(len(x) for x in prompts)
    return {"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion}


def _failure(e: Event) -> APIError:
    if e.finish_reason == "error":
        return APIError(500, f"decoding failed: {e.error}", type_="server_error")
    return APIError(503, "the server stopped before the request finished", type_="server_error",
                    code="shutting_down")


async def _watch_disconnect(request: Request, run: _Run) -> None:
    while True:
        await asyncio.sleep(0.1)
        if await request.is_disconnected():
            run.cancel()
            return


async def _answer(request: Request, state: ServerState, run: _Run, prompts: list[list[int]],
                  chat: bool, stream: bool, include_usage: bool) -> Response:
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    obj = "chat.completion" if chat else "text_completion"
    ids = bool(getattr(run.request, "return_token_ids", False))
    if stream:
        return StreamingResponse(_stream(state, run, prompts, chat, include_usage, ids, rid,
                                         created),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    texts = [""] * len(run.seqs)
    tokens: list[list[int]] = [[] for _ in run.seqs]
    reasons: list[str | None] = [None] * len(run.seqs)
    completion = 0
    watcher = asyncio.create_task(_watch_disconnect(request, run))
    try:
        async for i, e in run.events():
            texts[i] += e.text
            tokens[i] += e.tokens
            if e.finish_reason is not None:
                if e.finish_reason not in ("stop", "length"):
                    run.cancel()
                    raise _failure(e)
                reasons[i] = e.finish_reason
                completion += e.completion_tokens
    finally:
        watcher.cancel()
        run.cancel()  # no-op for finished sequences
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t},
                    "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    if ids:
        for c, tk in zip(choices, tokens):
            c["token_ids"] = tk
    return JSONResponse({"id": rid, "object": obj, "created": created,
                         "model": state.model_name, "choices": choices,
                         "usage": _usage(prompts, completion)})


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


async def _stream(state: ServerState, run: _Run, prompts: list[list[int]], chat: bool,
                  include_usage: bool, ids: bool, rid: str,
                  created: int) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    base = {"id": rid, "object": obj, "created": created, "model": state.model_name}

    def chunk(i: int, text: str | None, reason: str | None, role: bool = False,
              tokens: list[int] | None = None) -> bytes:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
        if ids:
            choice["token_ids"] = tokens or []
        return _sse({**base, "choices": [choice]})

    completion = 0
    try:
        if chat:
            for i in range(len(run.seqs)):
                yield chunk(i, "", None, role=True)
        async for i, e in run.events():
            if e.finish_reason is None:
                # with token ids, a step whose text is held back (half a UTF-8 character, a
                # possible stop string) still sends its ids: every token is sent exactly once
                if e.text or (ids and e.tokens):
                    yield chunk(i, e.text, None, tokens=e.tokens)
                continue
            if e.finish_reason not in ("stop", "length"):
                err = _failure(e)
                yield _sse(error_body(err.message, err.type, err.code))
                run.cancel()
                break
            completion += e.completion_tokens
            yield chunk(i, e.text, e.finish_reason, tokens=e.tokens)
        else:
            if include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(prompts, completion)})
        yield b"data: [DONE]\n\n"
    finally:  # the client went away (the task is cancelled), or we are done
        run.cancel()


# ---------------------------------------------------------------------------------------------
# The app.


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="multitoken", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    m = state.metrics

    def fail(err: APIError, endpoint: str) -> JSONResponse:
        m.requests.labels(endpoint, str(err.status)).inc()
        return JSONResponse(error_body(err.message, err.type, err.code, err.param),
                            status_code=err.status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return fail(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            msg = f"malformed JSON body: {first.get('ctx', {}).get('error', 'cannot parse')}"
            return fail(APIError(400, msg), request.url.path)
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = f"invalid request: {loc or 'body'}: {first.get('msg', 'invalid value')}"
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more)"
        return fail(APIError(400, msg, param=loc or None), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        return fail(APIError(exc.status_code, f"{detail}: {request.method} {request.url.path}",
                             type_=type_), request.url.path)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        return fail(APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                             type_="server_error"), request.url.path)

    @app.get("/health")
    async def health() -> JSONResponse:
        s = state.scheduler
        ok = not s.draining and not s.stopped
        return JSONResponse({"status": "ok" if ok else "draining", **s.stats()},
                            status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created,
            "owned_by": "multitoken", "max_model_len": state.context,
            "speculation": state.speculation}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(m.render(), media_type=m.content_type)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        _check_common(state, req)
        prompts = _prompts(state, req.prompt)
        limits = [_check_prompt(state, p, req.max_tokens, 16) for p in prompts]
        seqs = _sequences(state, req, prompts, limits, encode_stop(req.stop))
        run = _Run(state, seqs, req)
        m.requests.labels(request.url.path, "200").inc()
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await _answer(request, state, run, prompts, False, req.stream, include)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Response:
        _check_common(state, req)
        prompt = _chat_prompt(state, req)
        limit = _check_prompt(state, prompt, req.max_completion_tokens or req.max_tokens, None)
        stops = encode_stop(req.stop) + state.chat.stop
        run = _Run(state, _sequences(state, req, [prompt], [limit], stops), req)
        m.requests.labels(request.url.path, "200").inc()
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await _answer(request, state, run, [prompt], True, req.stream, include)

    return app
