"""`lorakit info`: what an adapter directory holds."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorakit.core.errors import LorakitError


@dataclass
class InfoConfig:
    adapter: str | None = None
    """Adapter directory."""
    json: bool = False
    """Print JSON."""


def run_info(cfg: InfoConfig) -> dict:
    """What an adapter is: base model, targets, ranks, trainable parameters, file size."""
    from safetensors import safe_open

    from lorakit.core.io import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config

    if not cfg.adapter:
        raise LorakitError("lorakit info needs an adapter directory: lorakit info DIR.")
    directory = Path(cfg.adapter)
    config = read_adapter_config(directory)
    weights = directory / WEIGHTS_NAME
    modules: dict[str, int] = {}
    n_params = 0
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            n = 1
            for d in shape:
                n *= d
            n_params += n
            if key.endswith(("lora_A.weight", "lora_embedding_A")):
                modules[key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]] = shape[0]
    info = {
        "base_model": config.base_model_name_or_path, "target_modules": config.target_modules,
        "r": config.r, "lora_alpha": config.lora_alpha, "use_rslora": config.use_rslora,
        "adapted_modules": len(modules), "ranks": sorted(set(modules.values())), "parameters": n_params,
        "file_bytes": weights.stat().st_size + (directory / CONFIG_NAME).stat().st_size,
    }
    if cfg.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:<16} {value}")
    return info
