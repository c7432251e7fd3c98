"""What a client asks the engine for and what it gets back: requests, sampling parameters, streamed deltas.

A `Request` carries a prompt (text, token ids, or chat messages), the adapter to serve it with (None: the
base) and its `SamplingParams`. `Engine.submit` answers with a `RequestHandle`: iterate it (or `async for`
it) for `Delta`s as tokens are generated; the last one carries the finish reason, and `result()` gives the
whole `Completion`. Nothing here knows about HTTP.
"""
from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from lorakit.core.errors import LorakitError

FINISH_REASONS = ("stop", "length", "abort", "error")
"""stop: a stop token or stop string; length: max_tokens; abort: cancelled; error: the engine could not serve it."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token, and when to stop.

    Args:
        max_tokens: most tokens to generate (the finish reason is "length" when they run out).
        temperature: 0 is greedy (argmax); above 0 samples from softmax(logits / temperature).
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1: all).
        top_k: keep the k most likely tokens (0: all).
        stop: strings that end the generation; the text returned stops before the first one.
        seed: the sampling seed: the same seed gives the same text whatever else shares the batch
            (None: a fresh random seed).
        ignore_eos: keep generating through the model's stop tokens (for benchmarks of fixed length).

    Raises:
        LorakitError: a value out of range, naming the field and what it accepts.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        _check(isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool) and self.max_tokens >= 1,
               f"max_tokens={self.max_tokens!r} is invalid: give a positive integer, e.g. 64.")
        _check(_is_number(self.temperature) and 0 <= self.temperature < math.inf,
               f"temperature={self.temperature!r} is invalid: give a number >= 0 (0 is greedy).")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1,
               f"top_p={self.top_p!r} is invalid: give a number in (0, 1] (1 keeps every token).")
        _check(isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0,
               f"top_k={self.top_k!r} is invalid: give an integer >= 0 (0 keeps every token).")
        _check(all(isinstance(s, str) and s for s in self.stop),
               f"stop={self.stop!r} is invalid: give non-empty strings.")
        _check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0),
               f"seed={self.seed!r} is invalid: give an integer >= 0, or None for a random one.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise LorakitError(message)


@dataclass
class Request:
    """One generation request.

    Args:
        prompt: text (tokenized as the tokenizer does by default), token ids (used as they are), or chat
            messages `[{"role": ..., "content": ...}]` (rendered with the model's chat template, with the
            assistant's turn opened).
        adapter: the name of a loaded adapter, or None for the base model.
        params: sampling parameters.
        request_id: any unique string (a fresh one by default).
    """

    prompt: str | list[int] | list[dict[str, str]]
    adapter: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class Delta:
    """What one engine step added to a request: new text (possibly empty: held back while it could still
    turn into a stop string or an incomplete character) and the new token ids; the last delta has a
    finish reason."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class Completion:
    """A finished request.

    Attributes:
        text: the generated text (stop strings and stop tokens left out).
        token_ids: every generated token (a final stop token included).
        finish_reason: "stop", "length", "abort" (cancelled) or "error".
        prompt_tokens, completion_tokens: the counts OpenAI calls usage.
        ttft_s: seconds from submission to the first token; total_s: to the last.
        error: what went wrong, for finish_reason "error".
    """

    request_id: str
    adapter: str | None
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    total_s: float
    error: str | None = None


class Driver(Protocol):
    """What a handle needs of the engine: whether its thread runs, else a way to run one step itself."""

    @property
    def running(self) -> bool: ...

    def step(self) -> bool: ...


class RequestHandle:
    """The engine's answer to `submit`: a stream of `Delta`s, then a `Completion`.

    Iterate it (`for delta in handle`) or `async for delta in handle`; `result()` waits for the end;
    `cancel()` frees the request's batch slot at the next step. Thread-safe: the engine thread pushes,
    any thread (or one asyncio loop) reads.
    """

    def __init__(self, request: Request, prompt_ids: list[int], driver: Driver) -> None:
        self.request = request
        self.prompt_ids = prompt_ids
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.completion: Completion | None = None
        self.cancelled = False
        self._driver = driver
        self._lock = threading.Lock()
        self._events: queue.SimpleQueue[Delta] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_events: asyncio.Queue[Delta] | None = None
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ask the engine to stop this request (finish reason "abort"); harmless once it has finished."""
        self.cancelled = True

    # ---- the engine's side ------------------------------------------------------------------------
    def push(self, delta: Delta, completion: Completion | None = None) -> None:
        """Deliver a delta (the engine calls this); a completion marks the end."""
        if self.first_token_at is None and delta.token_ids:
            self.first_token_at = time.perf_counter()
        with self._lock:
            if completion is not None:
                self.completion = completion
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._async_events.put_nowait, delta)
            else:
                self._events.put(delta)
        if completion is not None:
            self._done.set()

    # ---- the client's side ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Delta]:
        while True:
            try:
                delta = self._events.get(block=self._driver.running, timeout=None)
            except queue.Empty:  # no engine thread: this reader runs the engine's steps
                self._driver.step()
                continue
            yield self._checked(delta)
            if delta.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[Delta]:
        if not self._driver.running:
            raise LorakitError("async iteration needs the engine's own thread: call engine.start() first.")
        with self._lock:
            self._loop, self._async_events = asyncio.get_running_loop(), asyncio.Queue()
            while not self._events.empty():  # what arrived before this loop started listening
                self._async_events.put_nowait(self._events.get())
        while True:
            delta = await self._async_events.get()
            yield self._checked(delta)
            if delta.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the request to finish and return its Completion.

        Raises:
            LorakitError: the engine could not serve it (its message says why), or `timeout` passed.
        """
        while not self._driver.running and not self.done:
            self._driver.step()
        if not self._done.wait(timeout):
            raise LorakitError(f"request {self.request.request_id} did not finish within {timeout} s.")
        return self._checked_completion()

    def _checked(self, delta: Delta) -> Delta:
        if delta.finish_reason == "error":
            self._checked_completion()
        return delta

    def _checked_completion(self) -> Completion:
        if self.completion.finish_reason == "error":
            raise LorakitError(self.completion.error)
        return self.completion
