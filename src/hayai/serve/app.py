"""The HTTP layer: an OpenAI-compatible API over the continuous-batching scheduler, and the browser chat page.

Routes: POST /v1/chat/completions, POST /v1/completions (streamed as server-sent events or not), GET /v1/models,
GET /v1/models/{id}, GET /health (no auth: status and queue counts), GET / (the chat page) and /static/*.

Safety: with an API key every /v1 route needs `Authorization: Bearer KEY` (401 otherwise; compared in constant
time); request bodies are limited in size (413) and must be JSON (415 for another content type, which also keeps
other web sites from posting "simple" cross-origin requests); prompt + max_tokens is limited per request; a full
queue answers 503 with Retry-After; a client that disconnects (streaming or not) cancels its request, which frees
its batch row before the next decode step. When serving on loopback, requests whose Host header is not a loopback
name are refused (421), which defeats DNS-rebinding attacks from web pages the user visits.

The engine thread talks to the event loop through one asyncio.Queue per request, fed with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from hayai.errors import HayaiError
from hayai.models.tokenizer import Tokenizer
from hayai.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ChunkWriter,
    CompletionRequest,
    chat_response,
    completion_response,
    new_id,
    parse_request,
    sse,
)
from hayai.serve.scheduler import (
    ErrorEvent,
    Event,
    FinishEvent,
    GenerationRequest,
    QueueFullError,
    Scheduler,
    SchedulerClosedError,
    TextEvent,
    Ticket,
)

log = logging.getLogger("hayai.serve")
STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
PAGE_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass
class ServeSettings:
    """What the server answers to. Limits of None mean the scheduler's per-request length."""

    model_name: str
    aliases: Sequence[str] = ()  # other names clients may use for the model
    api_key: str | None = None
    max_tokens_cap: int | None = None  # the largest max_tokens a request may ask for
    max_request_tokens: int | None = None  # prompt + max_tokens
    max_body_bytes: int = 1 << 20
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)  # empty: any Host header
    manage_scheduler: bool = True  # start the scheduler with the app and close it on shutdown


def create_app(scheduler: Scheduler, tokenizer: Tokenizer, settings: ServeSettings) -> FastAPI:
    """A FastAPI app serving `scheduler`'s model under `settings.model_name`."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.manage_scheduler:
            scheduler.start()
        try:
            yield
        finally:
            if settings.manage_scheduler:
                await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="hayai", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    api = _API(scheduler, tokenizer, settings)
    _install_error_handlers(app)
    if settings.allowed_hosts:
        app.add_middleware(_HostGuard, allowed=settings.allowed_hosts)
    auth = [Depends(_bearer_auth(settings.api_key))]

    app.add_api_route("/v1/chat/completions", api.chat, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/completions", api.completions, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/models", api.models, methods=["GET"], dependencies=auth)
    app.add_api_route("/v1/models/{model_id:path}", api.model, methods=["GET"], dependencies=auth)
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/", _page, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class _API:
    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, settings: ServeSettings):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.settings = settings
        self.limit = scheduler.max_length
        self.cap = min(settings.max_tokens_cap or self.limit, self.limit)
        self.request_limit = min(settings.max_request_tokens or self.limit, self.limit)

    # ---- routes -------------------------------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        body = parse_request(ChatCompletionRequest, await _read_json(request, self.settings.max_body_bytes))
        model = self._check_model(body.model)
        body.refuse_unsupported()
        messages = body.chat_messages()
        if not self.tokenizer.has_chat_template:
            raise APIError(400, f"the model {model} has no chat template; use /v1/completions", param="messages")
        try:
            prompt_ids = self.tokenizer.encode_chat(messages)
        except HayaiError as exc:
            raise APIError(400, str(exc), param="messages") from None
        job = self._submit(body, prompt_ids, body.requested_max_tokens(), "messages")
        rid = new_id("chatcmpl")
        if body.stream:
            return self._stream(job, ChunkWriter("chat", rid, model, body.include_usage), len(prompt_ids))
        finish = await job.result(request)
        c = finish.completion
        _log_finish("chat", finish)
        return JSONResponse(chat_response(rid, model, c.text, c.finish_reason, len(prompt_ids), len(c.token_ids)))

    async def completions(self, request: Request) -> Response:
        body = parse_request(CompletionRequest, await _read_json(request, self.settings.max_body_bytes))
        model = self._check_model(body.model)
        body.refuse_unsupported()
        prompt = body.single_prompt()
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        echo = "" if not body.echo else prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)
        job = self._submit(body, prompt_ids, body.max_tokens, "prompt")
        rid = new_id("cmpl")
        if body.stream:
            return self._stream(job, ChunkWriter("completion", rid, model, body.include_usage), len(prompt_ids),
                                echo=echo)
        finish = await job.result(request)
        c = finish.completion
        _log_finish("completion", finish)
        return JSONResponse(completion_response(rid, model, echo + c.text, c.finish_reason, len(prompt_ids),
                                                len(c.token_ids)))

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model_id: str) -> dict[str, Any]:
        self._check_model(model_id)
        return self._model_card()

    async def health(self) -> dict[str, Any]:
        stats = self.scheduler.stats()
        return {"status": "ok", "running": stats.running + stats.prefilling, "waiting": stats.waiting,
                "max_batch": stats.max_batch, "max_queue": stats.max_queue, "completed": stats.completed,
                "cancelled": stats.cancelled}

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _model_card(self) -> dict[str, Any]:
        return {"id": self.settings.model_name, "object": "model", "created": 0, "owned_by": "hayai",
                "max_model_len": self.limit}

    def _check_model(self, name: str | None) -> str:
        served = self.settings.model_name
        if name and name != served and name not in self.settings.aliases:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{served}'", param="model",
                           code="model_not_found")
        return served

    def _submit(self, body: Any, prompt_ids: list[int], max_tokens: int | None, prompt_field: str) -> _Job:
        n = len(prompt_ids)
        if n == 0:
            raise APIError(400, f"{prompt_field} is empty", param=prompt_field)
        vocab = self.scheduler.model.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise APIError(400, f"prompt token ids must be in 0..{vocab - 1}", param=prompt_field)
        if max_tokens is not None and max_tokens > self.cap:
            raise APIError(400, f"max_tokens is {max_tokens}, above this server's cap of {self.cap}",
                           param="max_tokens")
        room = min(self.limit, self.request_limit) - n
        if max_tokens is None:
            max_tokens = min(self.cap, room)
        if max_tokens < 1 or n + max_tokens > self.limit:
            raise APIError(400, f"this model's maximum context length is {self.limit} tokens; however, you "
                           f"requested {n + max(max_tokens, 1)} tokens ({n} in the {prompt_field}, "
                           f"{max(max_tokens, 1)} in the completion); shorten the {prompt_field} or lower max_tokens",
                           param=prompt_field, code="context_length_exceeded")
        if n + max_tokens > self.request_limit:
            raise APIError(400, f"the request needs {n + max_tokens} tokens ({n} prompt + {max_tokens} max_tokens); "
                           f"this server allows at most {self.request_limit} per request", param="max_tokens",
                           code="request_too_large")
        stop_ids = frozenset() if body.ignore_eos else None
        request = GenerationRequest(prompt_ids, max_tokens, body.sampling(), body.stop_sequences(), stop_ids)
        return _Job(self.scheduler, request)

    def _stream(self, job: _Job, writer: ChunkWriter, prompt_tokens: int, echo: str = "") -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            try:
                first = writer.start()
                if first:
                    yield first
                if echo:
                    yield writer.text(echo)
                async for event in job.events():
                    if isinstance(event, TextEvent):
                        yield writer.text(event.text)
                    elif isinstance(event, FinishEvent):
                        c = event.completion
                        _log_finish(f"{writer.kind} stream", event)
                        yield writer.finish(c.finish_reason, prompt_tokens, len(c.token_ids))
                    else:
                        yield sse(APIError(500, event.message, type="server_error").body())
                        yield b"data: [DONE]\n\n"
            finally:  # normal end, or the client went away (the response task is cancelled)
                job.ticket.cancel()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


class _Job:
    """A submitted request seen from the event loop: its events arrive on an asyncio.Queue."""

    def __init__(self, scheduler: Scheduler, request: GenerationRequest):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:  # engine thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server stopping): nobody is listening any more
                self.ticket.cancel()

        try:
            self.ticket: Ticket = scheduler.submit(request, sink)
        except QueueFullError as exc:
            raise APIError(503, str(exc), type="server_error", code="server_busy",
                           headers={"Retry-After": str(exc.retry_after)}) from None
        except SchedulerClosedError as exc:
            raise APIError(503, str(exc), type="server_error", headers={"Retry-After": "5"}) from None
        except HayaiError as exc:
            raise APIError(400, str(exc)) from None

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self.queue.get()
            yield event
            if not isinstance(event, TextEvent):
                return

    async def result(self, request: Request) -> FinishEvent:
        """The final event, cancelling the request if the client disconnects first."""
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            async for event in self.events_or_disconnect(watcher):
                if isinstance(event, FinishEvent):
                    return event
                if isinstance(event, ErrorEvent):
                    raise APIError(500, event.message, type="server_error")
            raise APIError(499, "client closed the request")  # nobody reads this: the connection is gone
        finally:
            watcher.cancel()
            self.ticket.cancel()

    async def events_or_disconnect(self, watcher: asyncio.Future) -> AsyncIterator[Event]:
        while True:
            getter = asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                return
            event = getter.result()
            yield event
            if not isinstance(event, TextEvent):
                return


def _log_finish(kind: str, event: FinishEvent) -> None:
    stats = event.completion.stats
    log.info("%s: %d prompt + %d answer tokens, queued %.2f s, first token %.2f s, %.1f tok/s, %s", kind,
             stats.prompt_tokens, stats.generated_tokens, event.queued_seconds, event.first_token_seconds,
             stats.decode_tokens_per_second, event.completion.finish_reason)


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 415 unless it is declared JSON, 413 above `limit` bytes, 400 when malformed."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise APIError(415, f"the request body must be JSON (Content-Type: application/json), got "
                       f"'{content_type or 'none'}'")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body has {declared} bytes; this server accepts at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over {limit} bytes, the most this server accepts")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"malformed JSON in the request body: {exc.msg} (line {exc.lineno}, column "
                       f"{exc.colno})") from None
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8 text") from None


def _bearer_auth(api_key: str | None) -> Callable[[Request], Any]:
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return check


def _page() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"), headers=PAGE_SECURITY_HEADERS)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
        return JSONResponse(APIError(exc.status_code, str(message)).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))


class _HostGuard:
    """Refuse requests whose Host header names another machine (DNS rebinding against a loopback server)."""

    def __init__(self, app: Any, allowed: frozenset[str]):
        self.app = app
        self.allowed = frozenset(h.lower() for h in allowed)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in self.allowed:
                error = APIError(421, f"this server does not answer for host '{host}'")
                await JSONResponse(error.body(), status_code=421)(scope, receive, send)
                return
        await self.app(scope, receive, send)
