"""`lorakit info`: what an adapter directory holds, for any method or several; `--system`: this machine."""
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
    system: bool = False
    """Describe this machine instead: CPU, torch, threads, compute dtype and the kernels chosen here (autotune)."""


def system_info() -> dict:
    """This machine as lorakit sees it, and the kernel choices measured and cached on it."""
    import torch

    from lorakit.core import autotune
    from lorakit.training.models import default_device, default_dtype

    device = default_device()
    return {"cpu": autotune.cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": str(device), "compute_dtype": str(default_dtype(device)).replace("torch.", ""),
            "autotune_cache": str(autotune.cache_file()),
            "kernels": {entry: d.get("choice") for entry, d in autotune.decisions().items()}}


def run_info(cfg: InfoConfig) -> dict:
    """What an adapter of any method (or several) is: base model, the method's own settings (LoRA: targets
    and ranks; IA3: targets; prefix: virtual tokens ...), parameters, file size."""
    from lorakit.methods.combine import describe_adapter

    if cfg.system:
        info = system_info()
    elif not cfg.adapter:
        raise LorakitError("lorakit info needs an adapter directory (lorakit info DIR) or --system.")
    else:
        info = dict(describe_adapter(cfg.adapter))
    if cfg.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            if isinstance(value, dict):  # the kernel choices: one line each
                print(f"{key:<16} {len(value) or 'none measured yet'}")
                for entry, choice in value.items():
                    print(f"  {entry:<60} {choice}")
            else:
                print(f"{key:<16} {value}")
    return info
