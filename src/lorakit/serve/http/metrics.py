"""Prometheus metrics at /metrics (prometheus_client), one registry per server: requests by route and
status, prompt and generated tokens by model, time to first token and request latency histograms, and,
read from the engine at each scrape, running and queued requests and loaded adapters."""
from __future__ import annotations

from typing import Any

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """The server's counters and histograms, and the engine's gauges read at scrape time.

    Args:
        engine: the `lorakit.serve.Engine` served (its `stats()`).
        gate: the server's ConcurrencyGate (requests in flight, refusals).
    """

    def __init__(self, engine: Any, gate: Any) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("lorakit_requests", "HTTP requests answered, by route and status code.",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens of finished requests.", ["model"], registry=r)
        self.generation_tokens = Counter("lorakit_generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.finished = Counter("lorakit_request_finished", "Generation requests finished, by finish reason.",
                                ["model", "finish_reason"], registry=r)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "Time from the request to its first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("lorakit_request_latency_seconds", "Time from the request to its last token.",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        stat = lambda key: (lambda: engine.stats()[key])
        Gauge("lorakit_requests_running", "Requests in the engine's batch.", registry=r).set_function(stat("running"))
        Gauge("lorakit_requests_waiting", "Requests queued in the engine.", registry=r).set_function(stat("queued"))
        Gauge("lorakit_adapters_loaded", "Adapters served.", registry=r).set_function(stat("adapters"))
        Gauge("lorakit_adapters_in_memory", "Adapters held in memory.", registry=r).set_function(stat("adapters_in_memory"))
        Gauge("lorakit_http_requests_in_flight", "Generation requests admitted by the server and not finished.",
              registry=r).set_function(lambda: gate.in_flight)
        Gauge("lorakit_http_requests_refused", "Generation requests refused with 429 since start.",
              registry=r).set_function(lambda: gate.refused)

    def observe_completion(self, model: str, route: str, completion: Any) -> None:
        """Count a finished request's tokens, finish reason and latencies (a lorakit.serve.Completion)."""
        self.prompt_tokens.labels(model).inc(completion.prompt_tokens)
        self.generation_tokens.labels(model).inc(completion.completion_tokens)
        self.finished.labels(model, completion.finish_reason).inc()
        if completion.ttft_s is not None:
            self.ttft.observe(completion.ttft_s)
        self.latency.labels(route).observe(completion.total_s)

    def render(self) -> tuple[bytes, str]:
        """(the exposition text, its content type)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
          "/metrics", "/health", "/")


class RequestCounter:
    """ASGI middleware counting every HTTP response by route and status (unknown paths as "other")."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
