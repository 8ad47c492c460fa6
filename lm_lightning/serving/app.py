"""The routes of ``lm-lightning serve`` (FastAPI): OpenAI's ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions`` (``stream: true`` as server-sent events), ``/health`` and the chat page at ``/``.

Every error is OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a one-line message: a bad
request (malformed JSON, a wrong type, a value past a :class:`~lm_lightning.serving.limits.Limits`) is a 400, a
missing or wrong key a 401, an unknown model a 404; no answer carries a stack trace.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from lm_lightning.chat_template import ChatTemplate, check_messages
from lm_lightning.errors import UserError
from lm_lightning.generate import Sampling
from lm_lightning.serving.engine import Engine, Event, Request
from lm_lightning.serving.limits import Limits

PAGE = Path(__file__).with_name("page.html")


class ApiError(Exception):
    """An answer in OpenAI's error format."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """The fields both endpoints share (OpenAI's names; ``valid_utf8`` is ours)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    valid_utf8: bool = True
    """Keep the answer valid UTF-8 (the default); false samples from the model's distribution as it is."""


class CompletionRequest(_Common):
    prompt: str | list[str] = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class Server:
    """The state the routes share: the engine, its model's name and tokenizer, the limits, the key."""

    def __init__(self, engine: Engine, model_name: str, limits: Limits, api_key: str | None,
                 chat_template: ChatTemplate | None = None):
        """``chat_template``: the model's; ``None`` (a model without one): ``/v1/chat/completions`` is a 400."""
        self.engine, self.model_name, self.limits, self.api_key = engine, model_name, limits, api_key
        self.chat_template = chat_template
        self.block_size = engine.model.config.block_size
        self.created = int(time.time())

    def check_key(self, authorization: str) -> None:
        """Refuse (401) an ``Authorization`` header that is not ``Bearer <the key>``, where the server has a key."""
        if self.api_key is None:
            return
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header Authorization: Bearer <key> (the --api_key "
                           "the server was started with)", code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"model {name!r} is not served here; this server serves {self.model_name!r} (GET /v1/models)",
                           param="model", code="model_not_found")

    def check_choices(self, choices: int) -> None:
        if choices > self.limits.max_n:
            raise ApiError(400, f"the request asks for {choices} choices (n x prompts), more than the limit of "
                           f"{self.limits.max_n}; send several requests", param="n")

    def sampling(self, body: _Common, max_tokens: int | None, prompt_tokens: int, choices: int) -> Sampling:
        """The :class:`Sampling` of a request whose longest prompt has ``prompt_tokens`` tokens, after every limit."""
        limits, context = self.limits, self.block_size
        max_prompt = min(limits.max_prompt_tokens or context, context)
        if prompt_tokens > max_prompt:
            which = "the model's context" if max_prompt == context else "--limits.max_prompt_tokens"
            raise ApiError(400, f"the prompt has {prompt_tokens} tokens, more than the limit of {max_prompt} ({which}); "
                           "send a shorter prompt", param="messages" if isinstance(body, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        self.check_choices(choices)
        room = context - prompt_tokens
        if max_tokens is None:
            max_tokens = min(limits.max_tokens, room, 16 if isinstance(body, CompletionRequest) else room)
        if max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens={max_tokens} is more than the limit of {limits.max_tokens}", param="max_tokens")
        if max_tokens > room:
            raise ApiError(400, f"the prompt's {prompt_tokens} tokens + max_tokens={max_tokens} exceed the model's context "
                           f"of {context} tokens; ask for at most {room}", param="max_tokens", code="context_length_exceeded")
        if max_tokens < 1:
            raise ApiError(400, f"the prompt's {prompt_tokens} tokens fill the model's context of {context} tokens; "
                           "send a shorter prompt", param="prompt", code="context_length_exceeded")
        if (asked := choices * max_tokens) > limits.max_request_tokens:
            raise ApiError(400, f"{choices} choices x max_tokens={max_tokens} ask for {asked} tokens, more than the limit "
                           f"of {limits.max_request_tokens} per request", param="max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise ApiError(400, f"stop holds {len(stop)} strings; at most 4", param="stop")
        try:
            return Sampling(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                            stop=stop, valid_utf8=body.valid_utf8)
        except UserError as e:
            raise ApiError(400, str(e)) from None

    def encode(self, text: str) -> list[int]:
        generator = self.engine.generator
        return generator.tokenizer.encode(text).ids or [generator.eot_id]


class Guard:
    """ASGI middleware in front of every route: a body over ``max_body_bytes`` (by its Content-Length, else as it is
    read) is a 400, a ``/v1/`` request without the key a 401, before the body is parsed."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.server.limits.max_body_bytes
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self.server.check_key(headers.get("authorization", "")) if scope["path"].startswith("/v1/") else None
            if not headers.get("content-length", "0").isdigit():
                raise ApiError(400, "Content-Length is not a number")
            if (size := int(headers.get("content-length", "0"))) > limit:
                raise ApiError(400, f"the request body has {size} bytes, more than the limit of {limit}", code="request_too_large")
        except ApiError as e:
            return await e.response()(scope, receive, send)
        read = 0

        async def counted() -> dict:
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > limit:  # FastAPI passes an HTTPException raised while it reads the body on as it is
                raise HTTPException(400, f"the request body is more than the limit of {limit} bytes")
            return message

        await self.app(scope, counted, send)


def _run(server: Server, prompts: list[list[int]], sampling: Sampling, n: int,
         stop_tokens: frozenset[int] = frozenset()) -> tuple[list[Request], asyncio.Queue]:
    """Submit one engine request per prompt; their events arrive on the queue as ``(prompt index, Event)``."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    requests = []
    for p, ids in enumerate(prompts):
        def emit(event: Event, p: int = p) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (p, event))
        requests.append(Request(ids, sampling, emit, n, stop_tokens))
    for request in requests:
        server.engine.submit(request)
    return requests, events


async def _events(requests: list[Request], events: asyncio.Queue, n: int, client: HTTPRequest) -> AsyncIterator[tuple[int, Event]]:
    """``(choice index, Event)`` until every choice ended. The requests are cancelled (their rows leave the batch)
    when the caller stops early or the ``client`` goes away, looked at four times a second: Starlette stops a stream
    whose client left, but not a handler that waits for a whole answer."""

    async def watch() -> None:
        while not await client.is_disconnected():
            await asyncio.sleep(0.25)
        events.put_nowait(None)

    watcher = asyncio.create_task(watch())
    open_choices = len(requests) * n
    try:
        while open_choices:
            # What arrived while the last chunk was written goes out as one chunk per choice: a client (or a loop
            # serving many) that falls behind the engine catches up in one write instead of one write per token.
            items = [await events.get()]
            while not events.empty():
                items.append(events.get_nowait())
            merged: dict[int, Event] = {}
            for item in items:
                if item is None:
                    return
                p, event = item
                choice = p * n + event.index
                if choice in merged:
                    event = Event(event.index, merged.pop(choice).text + event.text, event.finish_reason, event.tokens)
                merged[choice] = event
            for choice, event in merged.items():
                if event.finish_reason is not None:
                    open_choices -= 1
                yield choice, event
    finally:
        watcher.cancel()
        for request in requests:
            request.cancelled = True


async def _parse(request: HTTPRequest, schema: type[BaseModel]) -> Any:
    """The body as ``schema``, whatever its Content-Type; a body that is not JSON or not the schema is a 400 naming
    the first problem."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body is a JSON {type(data).__name__}, not an object; send a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ApiError(400, f"{where or 'body'}: {first['msg']}", param=where or None) from None


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(server: Server) -> FastAPI:
    """The FastAPI app of ``server``; its lifespan starts the engine and, at shutdown, drains it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.engine.start()
        yield
        await asyncio.to_thread(server.engine.stop)

    app = FastAPI(title="lm-lightning", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, server=server)

    @app.exception_handler(ApiError)
    async def api_error(request: HTTPRequest, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: HTTPRequest, error: HTTPException) -> JSONResponse:
        detail = error.detail if error.status_code == 400 else f"{request.method} {request.url.path}: {error.detail}"
        return ApiError(error.status_code, detail).response()

    @app.exception_handler(Exception)
    async def crash(request: HTTPRequest, error: Exception) -> JSONResponse:
        return ApiError(500, f"internal error ({type(error).__name__}); the server log has the details",
                        type="server_error").response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": server.model_name, "in_flight": server.engine.in_flight()}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        text = PAGE.read_text(encoding="utf-8").replace("{{MODEL_JSON}}", json.dumps(server.model_name).replace("<", "\\u003c"))
        return HTMLResponse(text.replace("{{MODEL}}", html.escape(server.model_name)))

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "lm-lightning"}]}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await _parse(request, CompletionRequest)
        server.check_model(body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise ApiError(400, "prompt is an empty list; send a string or a list of strings", param="prompt")
        server.check_choices(len(texts) * body.n)  # before tokenizing thousands of prompts
        prompts = [server.encode(t) for t in texts]
        sampling = server.sampling(body, body.max_tokens, max(map(len, prompts)), len(prompts) * body.n)
        requests, events = _run(server, prompts, sampling, body.n)
        return await _answer(request, body, requests, events, "text_completion", sum(map(len, prompts)), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        body = await _parse(request, ChatRequest)
        server.check_model(body.model)
        template = server.chat_template
        if template is None:
            raise ApiError(400, f"{server.model_name} has no chat template (tokenizer_config.json chat_template, "
                           "chat_template.jinja or the checkpoint's); use /v1/completions", code="no_chat_template")
        tokenizer = server.engine.generator.tokenizer
        try:
            messages = check_messages([m.model_dump() for m in body.messages], "the request", need_assistant=False)
            ids = template.encode(tokenizer, messages, add_generation_prompt=True)
        except UserError as e:
            raise ApiError(400, str(e), param="messages") from None
        sampling = server.sampling(body, body.max_completion_tokens or body.max_tokens, len(ids), body.n)
        requests, events = _run(server, [ids], sampling, body.n, frozenset(template.stop_token_ids(tokenizer)))
        return await _answer(request, body, requests, events, "chat.completion", len(ids), chat=True)

    async def _answer(client: HTTPRequest, body: _Common, requests: list[Request], events: asyncio.Queue, kind: str, prompt_tokens: int,
                      chat: bool):
        """The whole answer, or (``stream``) an event stream of chunks ending in ``data: [DONE]``."""
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": ident, "created": int(time.time()), "model": server.model_name}
        choices = len(requests) * body.n

        def usage(completion: int) -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}

        def failed(event: Event) -> None:
            if event.finish_reason == "error":
                raise ApiError(500, "generation failed; the server log has the details", type="server_error")

        if not body.stream:
            texts, reasons, tokens = [""] * choices, [None] * choices, [0] * choices
            async for i, event in _events(requests, events, body.n, client):
                failed(event)
                texts[i] += event.text
                reasons[i], tokens[i] = event.finish_reason, event.tokens
            if chat:
                out = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r, "logprobs": None}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
            else:
                out = [{"index": i, "text": t, "finish_reason": r, "logprobs": None} for i, (t, r) in enumerate(zip(texts, reasons))]
            return {**head, "object": kind, "choices": out, "usage": usage(sum(tokens))}

        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        def chunk(i: int, text: str, reason: str | None, first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                choice = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": i, "text": text, "finish_reason": reason, "logprobs": None}
            return {**head, "object": chunk_kind, "choices": [choice], **({"usage": None} if include_usage else {})}

        async def stream() -> AsyncIterator[str]:
            tokens = [0] * choices
            if chat:
                for i in range(choices):
                    yield _sse(chunk(i, "", None, first=True))
            async for i, event in _events(requests, events, body.n, client):
                if event.finish_reason == "error":
                    yield _sse({"error": {"message": "generation failed; the server log has the details",
                                          "type": "server_error", "param": None, "code": None}})
                    return
                tokens[i] = event.tokens
                if event.text or event.finish_reason:
                    yield _sse(chunk(i, event.text, event.finish_reason))
            if include_usage:
                yield _sse({**head, "object": chunk_kind, "choices": [], "usage": usage(sum(tokens))})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app
