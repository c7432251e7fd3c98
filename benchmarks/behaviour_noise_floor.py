"""The behaviour probe's noise floor: the same base answering in bf16 vs fp32 (rounding only, no training).

    PYTHONPATH=src .venv/bin/python benchmarks/behaviour_noise_floor.py
"""
import time

import torch

from lorakit.training.knowledge import behaviour_answers, compare_behaviour
from lorakit.training.models import load_model


def main():
    device = torch.device("cpu")
    loaded = load_model(None, device=device, fast_cpu_attention=False)
    model, tokenizer = loaded.model.float(), loaded.tokenizer
    answers = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        start = time.time()
        answers[dtype] = behaviour_answers(model, tokenizer, device)
        print(f"{dtype}: {time.time() - start:.0f} s", flush=True)
    kept = compare_behaviour(answers[torch.float32], answers[torch.bfloat16], tokenizer)
    print(f"bf16 vs fp32: unchanged {kept.unchanged:.1%}, token agreement {kept.token_agreement:.1%}")


if __name__ == "__main__":
    main()
