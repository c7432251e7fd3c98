"""`lorakit plan --shard fsdp`'s per-device memory for Llama-2 7B and 70B (configs in benchmarks/configs, written
from the published hyper-parameters; nothing is downloaded) at N = 1, 2, 4, 8, LoRA and QLoRA, as a Markdown table.

    python benchmarks/fsdp_plan_table.py      # seconds: the models are built on the meta device
"""
from __future__ import annotations

from pathlib import Path

from lorakit.tools.plan import plan

CONFIGS = Path(__file__).with_name("configs")
DEVICE_GB = 80
SETTINGS = {"r": 16, "batch_size": 1, "seq_len": 2048, "dtype": "bf16", "device": "cuda"}


def main() -> None:
    print(f"per-device GB, bf16 compute, LoRA r={SETTINGS['r']} all-linear, 1 x {SETTINGS['seq_len']} tokens per "
          f"device, AdamW, activation checkpointing; last column: {DEVICE_GB} GB devices needed\n")
    print("| model | method | N=1 | N=2 | N=4 | N=8 | weights shard at N=8 | gathered (root + 2 blocks) | "
          f"{DEVICE_GB} GB devices |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ("llama-2-7b", "llama-2-70b"):
        results = {n: plan(str(CONFIGS / f"{name}.json"), nproc=n, device_gb=DEVICE_GB, **SETTINGS).shard
                   for n in (1, 2, 4, 8)}
        for method in ("lora", "qlora"):
            cells = [f"{results[n][method]['parts']['total_checkpointed'] / 1e9:.1f}" for n in (1, 2, 4, 8)]
            eight = results[8][method]
            print(f"| {name} | {method} | " + " | ".join(cells) +
                  f" | {eight['parts']['weights'] / 1e9:.1f} | {eight['parts']['gathered'] / 1e9:.2f} | "
                  f"{eight['devices_needed']} |")


if __name__ == "__main__":
    main()
