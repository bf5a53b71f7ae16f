"""A minimal OpenAI-compatible HTTP server for tests: /v1/completions and /v1/chat/completions over any hayai
prompting Backend (e.g. a LocalBackend on a tiny random model), on loopback, started on a free port.

It follows vLLM's convention where the OpenAI API is silent: a final assistant message is continued only when the
request body says `continue_final_message: true`; otherwise it is dropped, as by a server without prefill support.
It counts requests and the most requests in flight at once, so tests can see that a client sent them concurrently.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from hayai.prompting.backends import GenParams


class StubState:
    def __init__(self, delay: float):
        self.delay = delay
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        self.model_lock = threading.Lock()


def build_app(backend, model_name: str, delay: float = 0.0) -> tuple[FastAPI, StubState]:
    app = FastAPI()
    state = StubState(delay)

    def run(prompt, body: dict):
        with state.lock:
            state.requests += 1
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            state.bodies.append(body)
        try:
            time.sleep(state.delay)  # lets concurrent requests overlap visibly
            stop = body.get("stop") or ()
            params = GenParams(max_tokens=body.get("max_tokens") or 16, temperature=body.get("temperature", 1.0),
                               top_p=body.get("top_p", 1.0), seed=body.get("seed"),
                               stop=(stop,) if isinstance(stop, str) else tuple(stop))
            with state.model_lock:
                return backend.complete([prompt], params)[0]
        finally:
            with state.lock:
                state.in_flight -= 1

    def unknown(body: dict):
        if body.get("model") != model_name:
            return JSONResponse({"error": {"message": f"model {body.get('model')!r} not found", "type": "NotFound"}},
                                status_code=404)
        return None

    def usage(result) -> dict:
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens}

    @app.post("/v1/completions")
    def completions(body: dict):
        if (error := unknown(body)) is not None:
            return error
        result = run(body["prompt"], body)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name, "usage": usage(result),
                "choices": [{"index": 0, "text": result.text, "finish_reason": result.finish_reason,
                             "logprobs": None}]}

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        if (error := unknown(body)) is not None:
            return error
        messages = body["messages"]
        if messages[-1]["role"] == "assistant" and not body.get("continue_final_message"):
            # A server without prefill support: it answers the conversation before the assistant's prefix.
            messages = messages[:-1]
        result = run(messages, body)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name, "usage": usage(result),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}]}

    return app, state


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(backend, model_name: str = "stub-model", delay: float = 0.0):
    """Run the stub server in a background thread; yields (base_url, state)."""
    app, state = build_app(backend, model_name, delay)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the stub OpenAI server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1", state
    finally:
        server.should_exit = True
        thread.join(timeout=10)
