"""Training a lorakit-adapted model with the trainers people already have: transformers.Trainer, TRL's SFTTrainer.

A model adapted with `lorakit.apply` is still the same PreTrainedModel with only the LoRA factors trainable, so
either trainer runs it as it is (no `peft_config`). What they cannot do is write a PEFT adapter for it: their own
`save_model` writes the whole model. `SaveAdapterCallback` does that through `lorakit.save_adapter`:

    lorakit.apply(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=Collator(tokenizer.pad_token_id),
                      callbacks=[SaveAdapterCallback()])
    trainer.train()     # -> <output_dir>/adapter/ and <output_dir>/checkpoint-N/adapter/ (PEFT format)

`examples` can come from lorakit's own data path (`tokenize_records`: input_ids and labels, -100 on prompts).
See docs/trainer-interop.md.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

from lorakit.core.io import save_adapter
from lorakit.training.data.batching import collate

ADAPTER_DIR = "adapter"


class Collator:
    """Right-pads lorakit examples ({"input_ids", "labels"} lists) into a batch, as lorakit's own loop does.

    Args:
        pad_id: the tokenizer's pad token id.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Returns input_ids, attention_mask and labels (-100 on padding), each (batch, longest)."""
        return collate([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples], self.pad_id)


class SaveAdapterCallback(TrainerCallback):
    """Writes the model's lorakit adapter in PEFT format whenever the trainer saves, and once at the end.

    Args:
        adapter_name: the adapter to write; None: the model's first.
        directory_name: the adapter's folder inside output_dir and inside each checkpoint-N folder.
    """

    def __init__(self, adapter_name: str | None = None, directory_name: str = ADAPTER_DIR) -> None:
        self.adapter_name, self.directory_name = adapter_name, directory_name

    def on_save(self, args, state, control, model=None, **kwargs):
        """Next to the trainer's checkpoint-N folder's files, an `adapter/` that PEFT and lorakit load."""
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            save_adapter(model, checkpoint / self.directory_name, self.adapter_name)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        """The trained adapter in <output_dir>/adapter."""
        if state.is_world_process_zero:
            save_adapter(model, Path(args.output_dir) / self.directory_name, self.adapter_name)
        return control
