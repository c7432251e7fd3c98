"""`lorakit plan --shard fsdp`: per-device parts follow the sharding (weights, gradients and optimizer states
shrink as 1/N; the gathered units, activations and logits do not), the unit sizes are the real modules'."""
import json

import pytest
from conftest import tiny_llama
from transformers import LlamaConfig

import lorakit
from lorakit import LoraConfig, LorakitError
from lorakit.cli.main import main
from lorakit.tools.plan import plan
from lorakit.tools.plan_shard import Units, devices_needed, shard_parts

LLAMA = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def test_parts_shrink_with_the_world_except_what_every_device_runs():
    parts = {"weights": 8000, "activations": 300, "activations_checkpointed": 30}
    one, four = (shard_parts(parts, 100, Units(block=50, root=70), n, logits=9) for n in (1, 4))
    assert (one["weights"], four["weights"]) == (8000, 2000)
    assert (four["gradients"], four["optimizer_states"]) == (100, 200)
    for key in ("gathered", "activations", "logits"):
        assert one[key] == four[key]
    assert four["gathered"] == 70 + 2 * 50
    assert four["total_checkpointed"] == 2000 + 100 + 200 + 170 + 9 + 30


def test_devices_needed_is_the_first_power_of_two_that_fits():
    per = lambda n: {"total_checkpointed": 100 + 1000 / n}  # noqa: E731
    assert devices_needed(per, 400) == 4 and devices_needed(per, 2000) == 1 and devices_needed(per, 100) is None


def test_units_are_the_real_block_and_root_sizes():
    result = plan(LLAMA.to_dict() | {"model_type": "llama"}, r=4, dtype="fp32", nproc=2, device_gb=1)
    model = tiny_llama()
    lorakit.apply(model, LoraConfig(r=4, target_modules="all-linear"))
    block = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    root = sum(p.numel() for name, p in model.named_parameters() if ".layers." not in name) * 4
    lora = result.shard["lora"]["parts"]
    assert lora["gathered"] == root + 2 * block
    unsharded = {m.method: m.memory for m in result.methods}["lora"]
    assert lora["weights"] == -(-unsharded["weights"] // 2)
    assert result.shard["lora"]["fits"] and result.shard["lora"]["devices_needed"] == 1
    assert result.shard["qlora"]["parts"]["weights"] < lora["weights"]


def test_cli_prints_the_sharded_table_and_refuses_nproc_without_shard(capsys):
    config = json.dumps(LLAMA.to_dict() | {"model_type": "llama"})
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        f.write(config)
        f.flush()
        assert main(["plan", f.name, "--shard", "fsdp", "--nproc", "4", "--device-gb", "0.001"]) == 0
        out = capsys.readouterr().out
        assert "over 4 processes" in out and "fits 0.001 GB" in out
        assert main(["plan", f.name, "--nproc", "4"]) != 0
        assert "--shard fsdp" in capsys.readouterr().err
    with pytest.raises(LorakitError):
        plan(LLAMA.to_dict() | {"model_type": "llama"}, dtype="fp64")
