"""The OpenAI-compatible routes over a running `lorakit.serve.Engine` (FastAPI).

    GET  /                          the playground page
    GET  /health                    200 while serving, 503 while stopping
    GET  /metrics                   Prometheus metrics
    GET  /v1/models                 the base and every served adapter (adapters name their parent)
    POST /v1/completions            text or token-id prompts
    POST /v1/chat/completions       chat messages, rendered with the model's chat template
    POST /v1/load_lora_adapter      {"lora_name", "lora_path"}: only inside --adapter-dir
    POST /v1/unload_lora_adapter    {"lora_name"}: waits for the requests that use it

The `model` field picks the adapter, or the base by its name. Bodies are parsed here (not by FastAPI's
parameter binding) so that every client mistake is a 400 in OpenAI's shape, whatever the content type.
"""
from __future__ import annotations

import asyncio
import json
import time
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from lorakit.core.errors import LorakitError
from lorakit.serve.http.adapters_root import resolve_inside
from lorakit.serve.http.errors import APIError, install_handlers, validation_message
from lorakit.serve.http.generation import Exchange, ServerState, prepare, submit_all
from lorakit.serve.http.responses import ChunkWriter, full_response, new_id
from lorakit.serve.http.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
)


async def parse_body(request, model: type):
    """The request's JSON body checked against `model`.

    Raises:
        APIError: 400 for a body that is not JSON, not an object, or does not fit the model.
    """
    from pydantic import ValidationError

    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}; send a JSON object.", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body is a JSON {type(data).__name__}; send a JSON object.", None, "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(e.errors())
        raise APIError(400, message, param, "invalid_request") from None


def model_card(name: str, created: int, parent: str | None = None, root: str | None = None) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "lorakit", "root": root or name,
            "parent": parent, "permission": []}


async def generate(state: ServerState, request, body, prompts: list, kind: str):
    """Serve a completion or chat request: admitted by the gate, prepared, submitted, answered."""
    count = len(prompts) * body.n
    state.gate.acquire(count)  # 429 before any work
    try:
        prepared = await asyncio.to_thread(prepare, state, body, prompts, kind)
        handles = await asyncio.to_thread(submit_all, state, prepared)
    except BaseException:
        state.gate.release(count)
        raise
    route = "chat" if kind == "chat" else "completions"
    exchange = Exchange(state, route, body.model, handles, request.receive)
    request_id = new_id(kind)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        writer = ChunkWriter(kind, request_id, body.model, include_usage)
        return StreamingResponse(stream(exchange, writer, prepared.prompt_of), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    async for _, _, finish, error in exchange.events():
        if finish == "error":
            raise APIError(500, f"the engine failed the request: {error}")
        if finish == "abort":
            raise APIError(503, "the server is stopping; the request was not finished.", code="unavailable")
    completions = [h.completion for h in handles]
    for c, p in zip(completions, prepared.prompt_of):
        c.prompt_key = p
    return JSONResponse(full_response(kind, request_id, body.model, completions))


async def stream(exchange: Exchange, writer: ChunkWriter, prompt_of: list[int]):
    """The server-sent events of a streamed request."""
    from lorakit.serve.http.errors import error_body

    async for index, text, finish, error in exchange.events():
        if finish == "error":
            yield writer.error(error_body(500, f"the engine failed the request: {error}"))
        elif finish == "abort":
            yield writer.error(error_body(503, "the server is stopping; the request was not finished.", code="unavailable"))
        elif text or finish is not None or index not in writer.started:
            yield writer.delta(index, text, finish)
    if writer.include_usage:
        completions = [h.completion for h in exchange.handles]
        prompt = sum({p: c.prompt_tokens for c, p in zip(completions, prompt_of)}.values())
        yield writer.usage_chunk(prompt, sum(c.completion_tokens for c in completions))
    yield writer.done()


def add_model_routes(app, state: ServerState, started: int) -> None:
    """GET /v1/models, /v1/models/{name}; POST /v1/load_lora_adapter, /v1/unload_lora_adapter."""

    def cards() -> list[dict]:
        adapters = [model_card(n, started, state.base_name, state.adapter_sources.get(n))
                    for n in sorted(state.engine.adapters) if n not in state.draining]
        return [model_card(state.base_name, started)] + adapters

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": cards()}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        card = next((c for c in cards() if c["id"] == name), None)
        if card is None:
            state.adapter_for(name)  # raises the 404
        return card

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request):
        body = await parse_body(request, LoadAdapterRequest)
        if state.adapter_root is None:
            raise APIError(404, "loading adapters at run time is off; start the server with --adapter-dir ROOT "
                                "to allow loads from inside ROOT.", None, "not_enabled")
        if body.lora_name == state.base_name or body.lora_name in state.engine.adapters:
            raise APIError(400, f"the name {body.lora_name!r} is taken; unload it first or pick another name.",
                           "lora_name", "name_taken")
        try:
            directory = resolve_inside(state.adapter_root, body.lora_path)
            await asyncio.to_thread(state.engine.load_adapter, body.lora_name, directory)
        except LorakitError as e:
            raise APIError(400, str(e), "lora_path", "invalid_adapter") from None
        state.adapter_sources[body.lora_name] = body.lora_path
        return {"status": "ok", "message": f"adapter {body.lora_name!r} loaded", "model": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request):
        body = await parse_body(request, UnloadAdapterRequest)
        name = body.lora_name
        if name not in state.engine.adapters or name in state.draining:
            raise APIError(404, f"no adapter named {name!r} is loaded.", "lora_name", "model_not_found")
        state.draining.add(name)  # new requests for it now get 404; the ones it has finish first
        try:
            deadline = time.monotonic() + state.drain_timeout_s
            while state.engine.requests_using(name) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            state.engine.unload_adapter(name)
        finally:
            state.draining.discard(name)
        state.adapter_sources.pop(name, None)
        return {"status": "ok", "message": f"adapter {name!r} unloaded", "model": name}


def create_app(state: ServerState, api_key: str | None = None, max_body_bytes: int = 1 << 20):
    """The ASGI app over `state.engine` (whose thread must run: `engine.start()`).

    Args:
        state: the engine and what the routes share.
        api_key: with one, every route but / and /health needs `Authorization: Bearer KEY`.
        max_body_bytes: larger request bodies are refused with 413.
    """
    from lorakit.serve.http.auth import APIKeyMiddleware
    from lorakit.serve.http.limits import BodyLimitMiddleware
    from lorakit.serve.http.metrics import RequestCounter

    app = FastAPI(title="lorakit serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lorakit = state
    install_handlers(app)
    started = int(time.time())
    page = resources.files("lorakit.serve.http").joinpath("playground.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        ok = state.engine.running
        return JSONResponse({"status": "ok" if ok else "stopping"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        data, content_type = state.metrics.render()
        return Response(data, media_type=content_type)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse_body(request, CompletionRequest)
        return await generate(state, request, body, body.prompts(), "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatCompletionRequest)
        return await generate(state, request, body, [[m.as_engine() for m in body.messages]], "chat")

    add_model_routes(app, state, started)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)  # before auth reads anything
    app.add_middleware(RequestCounter, metrics=state.metrics)  # outermost: counts 401s and 413s too
    return app
