"""The options of `lorakit serve` (the dataclass is the CLI: each field is a flag, its docstring the help)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lorakit.core.errors import LorakitError


@dataclass
class ServeConfig:
    model: str | None = None
    """Base model: 'default' (embedded SmolLM2-135M-Instruct), a .gguf file, or a Hugging Face model directory."""
    adapter: list[str] = field(default_factory=list)
    """Adapters to serve from the start, as NAME=DIR (comma-separated for several); `model: NAME` picks one."""
    adapter_dir: str | None = None
    """Root directory that POST /v1/load_lora_adapter may load from (run-time loading is off without it)."""
    host: str = "127.0.0.1"
    """Address to bind (0.0.0.0 exposes the server to the network: set --api-key then)."""
    port: int = 8000
    """Port to listen on."""
    api_key: str | None = None
    """Require 'Authorization: Bearer KEY' on every route but / and /health (default: $LORAKIT_API_KEY if set)."""
    served_model_name: str | None = None
    """The `model` name of the base (default: the --model value, or 'default')."""
    device: str | None = None
    """cpu, cuda ...; default: cuda if available."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Serving dtype (auto: the device's fastest)."""
    max_batch_size: int = 16
    """Requests decoded together in one batch."""
    max_seq_len: int = 2048
    """Context length served: prompt + max_tokens of one request."""
    max_loaded_adapters: int = 8
    """Adapters held in memory; the least recently used idle one is dropped and read again on demand."""
    max_concurrency: int = 64
    """Generation requests in flight (running + queued); more get 429 with Retry-After."""
    max_body_bytes: int = 1 << 20
    """Largest request body (bytes); larger ones get 413."""
    shutdown_timeout: float = 30.0
    """On SIGTERM/SIGINT: seconds to let in-flight requests finish before they are cut."""

    def __post_init__(self) -> None:
        for name in ("max_loaded_adapters", "max_concurrency", "max_batch_size", "max_seq_len", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LorakitError(f"--{name.replace('_', '-')} {value!r} is invalid: give a positive integer.")
        if not 0 <= self.port <= 65535:
            raise LorakitError(f"--port {self.port} is invalid: give 0-65535 (0: any free port).")
        self.adapters()  # checked now, not after the model has loaded

    def adapters(self) -> dict[str, str]:
        """{name: directory} from the --adapter NAME=DIR values.

        Raises:
            LorakitError: a value without '=', an empty name or a name given twice.
        """
        out: dict[str, str] = {}
        for item in self.adapter:
            name, sep, directory = item.partition("=")
            if not sep or not name.strip() or not directory.strip():
                raise LorakitError(f"--adapter {item!r} is invalid: write NAME=DIR, e.g. --adapter orders=runs/demo/adapter.")
            if name in out:
                raise LorakitError(f"--adapter names {name!r} twice; give each adapter its own name.")
            out[name.strip()] = directory.strip()
        return out
