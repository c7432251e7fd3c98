"""Largest logits difference between lorakit and Hugging Face PEFT, both directions, on the tiny GPT-2,
Llama and BERT models and adapter configs of tests/test_io.py.

    .venv/bin/python benchmarks/peft_agreement.py
"""
import sys
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import lorakit  # noqa: E402
from conftest import input_ids, randomize_lora  # noqa: E402
from test_io import CONFIGS, MODELS  # noqa: E402

ids = input_ids()
worst = 0.0
for arch, build in MODELS.items():
    ours = build()
    lorakit.apply(ours, lorakit.LoraConfig(**CONFIGS[arch]))
    randomize_lora(ours)
    saved = tempfile.mkdtemp()
    lorakit.save_adapter(ours, saved)
    theirs = get_peft_model(build(), PeftLoraConfig(init_lora_weights=False, **CONFIGS[arch])).eval()
    saved_by_peft = tempfile.mkdtemp()
    theirs.save_pretrained(saved_by_peft)
    with torch.no_grad():
        to_peft = (ours(ids).logits - PeftModel.from_pretrained(build(), saved)(ids).logits).abs().max().item()
        from_peft = (theirs(ids).logits - lorakit.load_adapter(build(), saved_by_peft)(ids).logits).abs().max().item()
    print(f"{arch:<6} lorakit -> PEFT max |dlogits| {to_peft:.2e}   PEFT -> lorakit {from_peft:.2e}")
    worst = max(worst, to_peft, from_peft)
print(f"largest logits difference against PEFT: {worst:.2e}")
