"""From a checked OpenAI request to engine requests and back: which adapter the `model` field names,
the prompt's tokens and the context check, the sampling parameters, and the `Exchange` that carries one
HTTP request's engine handles until they finish.

The engine runs its steps in its own thread; each handle is read by an asyncio task (`async for`), so the
event loop never blocks on generation. A client that leaves cancels its handles at once (its batch
rows are freed at the engine's next step), whether or not its response had started.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.core.errors import LorakitError
from lorakit.serve.http.errors import APIError
from lorakit.serve.http.limits import ConcurrencyGate
from lorakit.serve.http.metrics import Metrics
from lorakit.serve.requests import Request, RequestHandle, SamplingParams

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


@dataclass
class ServerState:
    """What the routes share: the engine, the limits and metrics, and the served names.

    Attributes:
        base_name: the `model` name of the base model.
        adapter_root: where run-time loads may read (None: run-time loading is off).
        adapter_sources: adapter name -> the path it was loaded from, as given.
        draining: adapters being unloaded: new requests are refused, running ones finish.
    """

    engine: Any
    gate: ConcurrencyGate
    metrics: Metrics
    base_name: str
    adapter_root: Path | None = None
    drain_timeout_s: float = 30.0
    adapter_sources: dict[str, str] = field(default_factory=dict)
    draining: set[str] = field(default_factory=set)
    # one tokenization at a time: a Rust tokenizer called from several threads can fail with "Already borrowed"
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)

    def adapter_for(self, model: str) -> str | None:
        """The adapter that `model` names (None: the base).

        Raises:
            APIError: 404 for a name that is neither the base nor a served adapter.
        """
        if model == self.base_name:
            return None
        if model in self.draining or model not in self.engine.adapters:
            served = ", ".join([self.base_name] + sorted(self.engine.adapters))
            raise APIError(404, f"the model {model!r} does not exist on this server; served: {served} "
                                "(GET /v1/models lists them).", "model", "model_not_found")
        return model


@dataclass
class Prepared:
    """One HTTP request turned into engine requests: one per prompt and choice, in OpenAI's index order."""

    adapter: str | None
    requests: list[Request]
    prompt_of: list[int]  # the prompt each request is for (choices of one prompt share its prompt tokens)


def sampling(body: Any, max_tokens: int, choice: int) -> SamplingParams:
    """The engine's sampling parameters for one choice (choice k of a seeded request draws with seed + k)."""
    seed = None if body.seed is None else body.seed + choice
    top_k = 0 if body.top_k in (None, -1) else body.top_k
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    top_p = 1.0 if body.top_p is None else float(body.top_p)
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                          stop=body.stops(), seed=seed, ignore_eos=body.ignore_eos)


def prepare(state: ServerState, body: Any, prompts: list, kind: str) -> Prepared:
    """Check `body` against the model and the context, and build its engine requests.

    Args:
        prompts: text, token ids, or chat messages (one list per prompt).
        kind: "chat" or "completion".

    Raises:
        APIError: 400 for an unsupported field, a bad prompt or one over the context; 404 for an unknown model.
    """
    unsupported = body.unsupported()
    if unsupported:
        raise APIError(400, f"{unsupported} is not supported by lorakit serve; leave it out.", unsupported,
                       "unsupported_parameter")
    adapter = state.adapter_for(body.model)
    engine, limit = state.engine, state.engine.config.max_seq_len
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    param = "messages" if kind == "chat" else "prompt"
    requests, prompt_of = [], []
    for p, prompt in enumerate(prompts):
        try:
            with state.tokenizer_lock:
                ids = engine.prompt_ids(prompt)
        except LorakitError as e:
            raise APIError(400, str(e), param, "invalid_prompt") from None
        max_tokens = asked or (DEFAULT_COMPLETION_TOKENS if kind == "completion" else limit - len(ids))
        if len(ids) + max_tokens > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens; you requested "
                                f"{len(ids) + max_tokens} tokens ({len(ids)} in the {param}, {max_tokens} for the "
                                "completion). Shorten the prompt or lower max_tokens.",
                           param if asked is None or len(ids) >= limit else "max_tokens", "context_length_exceeded")
        try:
            requests += [Request(ids, adapter, sampling(body, max_tokens, k)) for k in range(body.n)]
        except LorakitError as e:
            raise APIError(400, str(e), None, "invalid_request") from None
        prompt_of += [p] * body.n
    return Prepared(adapter, requests, prompt_of)


def submit_all(state: ServerState, prepared: Prepared) -> list[RequestHandle]:
    """Queue the engine requests; on a refusal, cancel the ones already queued.

    Raises:
        APIError: 404 if the adapter was unloaded meanwhile, 503 if the engine is stopping.
    """
    handles: list[RequestHandle] = []
    try:
        for request in prepared.requests:
            handles.append(state.engine.submit(request))
    except LorakitError as e:
        for h in handles:
            h.cancel()
        if prepared.adapter is not None and prepared.adapter not in state.engine.adapters:
            raise APIError(404, str(e), "model", "model_not_found") from None
        raise APIError(503, f"the server cannot take the request now: {e}", None, "unavailable") from None
    return handles


class Exchange:
    """One HTTP request's engine handles in flight: their deltas merged into one queue, its places in the
    concurrency gate given back and its metrics counted as each finishes, and a watch on the client that
    cancels the handles when it disconnects.

    Args:
        state: the server's state.
        route: for the metrics ("completions" or "chat").
        model: the `model` name, for the metrics.
        handles: the engine handles, in choice order (the gate already holds one place for each).
        receive: the ASGI receive channel (its http.disconnect ends the exchange early), or None.
    """

    def __init__(self, state: ServerState, route: str, model: str, handles: list[RequestHandle], receive=None) -> None:
        self.state, self.route, self.model, self.handles = state, route, model, handles
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending = len(handles)
        self.pumps = [asyncio.create_task(self._pump(i, h)) for i, h in enumerate(handles)]
        self.watcher = asyncio.create_task(self._watch(receive)) if receive is not None else None

    async def _pump(self, index: int, handle: RequestHandle) -> None:
        try:
            async for delta in handle:
                self.queue.put_nowait((index, delta.text, delta.finish_reason, None))
        except LorakitError as e:  # the engine could not serve it
            self.queue.put_nowait((index, "", "error", str(e)))
        except asyncio.CancelledError:
            handle.cancel()
            raise
        finally:
            self.state.gate.release(1)
            if handle.completion is not None:
                self.state.metrics.observe_completion(self.model, self.route, handle.completion)

    async def _watch(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.cancel()
                return

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def events(self):
        """(choice index, new text, finish reason or None, error or None) until every choice has finished."""
        try:
            while self.pending:
                event = await self.queue.get()
                if event[2] is not None:
                    self.pending -= 1
                yield event
        finally:
            self.cancel()  # harmless for finished handles; frees the rows of a response that was abandoned
            if self.watcher is not None:
                self.watcher.cancel()
