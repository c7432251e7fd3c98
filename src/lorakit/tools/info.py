"""`lorakit info`: what an adapter directory holds, for any method or several."""
from __future__ import annotations

import json
from dataclasses import dataclass

from lorakit.core.errors import LorakitError


@dataclass
class InfoConfig:
    adapter: str | None = None
    """Adapter directory."""
    json: bool = False
    """Print JSON."""


def run_info(cfg: InfoConfig) -> dict:
    """What an adapter of any method (or several) is: base model, the method's own settings (LoRA: targets
    and ranks; IA3: targets; prefix: virtual tokens ...), parameters, file size."""
    from lorakit.methods.combine import describe_adapter

    if not cfg.adapter:
        raise LorakitError("lorakit info needs an adapter directory: lorakit info DIR.")
    info = dict(describe_adapter(cfg.adapter))
    if cfg.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:<16} {value}")
    return info
