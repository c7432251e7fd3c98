"""lorakit: LoRA fine-tuning for PyTorch and Hugging Face models.

    import lorakit as lora                       # loralib's API
    layer = lora.Linear(768, 768, r=8, lora_alpha=16)
    lora.mark_only_lora_as_trainable(model, bias="lora_only")
    optimizer = torch.optim.AdamW(lora.lora_parameters(model), lr=1e-3)

    import lorakit                               # PEFT-style adaptation of an existing model
    lorakit.apply(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    lorakit.save_adapter(model, "adapter/")      # readable by peft.PeftModel.from_pretrained

Importing lorakit imports torch and nothing heavier; the CLI's libraries load on demand.
"""
from lorakit.core.active import (
    active_adapters,
    adapter_names,
    delete_adapter,
    lora_configs,
    lora_layers,
    set_adapter,
)
from lorakit.core.adapters import (
    Summary,
    add_weighted_adapter,
    disable_adapters,
    merge,
    merge_and_unload,
    summary,
    unmerge,
)
from lorakit.core.config import LoraConfig
from lorakit.core.errors import LorakitError
from lorakit.core.inject import apply
from lorakit.core.io import load_adapter, read_adapter_config, save_adapter
from lorakit.core.layers import LoraLayer
from lorakit.core.loralib_api import (
    Conv1d,
    Conv2d,
    Conv3d,
    Embedding,
    Linear,
    MergedLinear,
    lora_parameters,
    lora_state_dict,
    mark_only_lora_as_trainable,
)

__version__ = "0.1.0"

__all__ = [
    "Conv1d", "Conv2d", "Conv3d", "Embedding", "Linear", "LoraConfig", "LoraLayer", "LorakitError", "MergedLinear",
    "Summary", "active_adapters", "adapter_names", "add_weighted_adapter", "apply", "delete_adapter",
    "disable_adapters", "load_adapter", "lora_configs", "lora_layers", "lora_parameters", "lora_state_dict",
    "mark_only_lora_as_trainable", "merge", "merge_and_unload", "read_adapter_config", "save_adapter", "set_adapter",
    "summary", "unmerge",
]
