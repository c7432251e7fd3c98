"""The behaviour probe's noise floor: the same base answering in bf16 vs fp32 (rounding only, no training).

    PYTHONPATH=src .venv/bin/python benchmarks/behaviour_noise_floor.py
"""
import torch, time
from lorakit.training.models import load_model
from lorakit.training.knowledge import behaviour_answers, compare_behaviour
dev = torch.device("cpu")
loaded = load_model(None, device=dev, fast_cpu_attention=False)
model, tok = loaded.model.float(), loaded.tokenizer
t = time.time(); fp32 = behaviour_answers(model, tok, dev); print("fp32", time.time() - t, flush=True)
model.to(torch.bfloat16)
t = time.time(); bf16 = behaviour_answers(model, tok, dev); print("bf16", time.time() - t, flush=True)
kept = compare_behaviour(fp32, bf16, tok)
print(f"bf16 vs fp32: unchanged {kept.unchanged:.1%}, token agreement {kept.token_agreement:.1%}")
