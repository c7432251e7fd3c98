"""Serving: a generation engine with one base model, many LoRA/DoRA adapters per batch, continuous batching
and streamed results. Below the HTTP layer: nothing here knows about HTTP.

    from lorakit.serve import Engine, EngineConfig, Request, SamplingParams

It may import core, methods and training; tools and cli import it.
"""
from lorakit.serve.engine import Engine, EngineConfig
from lorakit.serve.requests import (
    Completion,
    Delta,
    Request,
    RequestHandle,
    SamplingParams,
)

__all__ = ["Completion", "Delta", "Engine", "EngineConfig", "Request", "RequestHandle", "SamplingParams"]
