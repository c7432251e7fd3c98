"""`lorakit plan`: exact parameter counts and adapter sizes against real models, memory formulas against measurements."""
import copy
import json

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import LoraConfig, LorakitError
from lorakit.cli.main import main
from lorakit.core.quantize import quantize_model, tensor_bytes
from lorakit.tools.plan import plan
from lorakit.training.loss import loss_sum

LLAMA = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
GPT2 = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
CASES = [(LLAMA, tiny_llama, 4, "all-linear"), (LLAMA, tiny_llama, 8, ["q_proj", "v_proj", "down_proj"]),
         (GPT2, tiny_gpt2, 4, "all-linear"), (GPT2, tiny_gpt2, 2, ["c_attn"])]


@pytest.mark.parametrize("config, build, r, targets", CASES)
def test_counts_and_adapter_size_are_exact(config, build, r, targets, tmp_path):
    result = plan(config.to_dict(), r=r, target_modules=targets)
    model = build()
    base = lorakit.summary(model, print_summary=False).total_params
    lorakit.apply(model, LoraConfig(r=r, target_modules=targets))
    real = lorakit.summary(model, print_summary=False)
    methods = {m.method: m for m in result.methods}
    assert result.base_params == methods["full"].total_params == methods["full"].trainable_params == base
    for name in ("lora", "qlora"):
        assert (methods[name].total_params, methods[name].trainable_params) == (real.total_params, real.trainable_params)
    layers = dict(lorakit.lora_layers(model))
    assert {m.name for m in result.modules} == set(layers)
    for m in result.modules:
        A, B = layers[m.name].factors("default")
        assert (m.shape_a, m.shape_b, m.params) == (tuple(A.shape), tuple(B.shape), A.numel() + B.numel())
    lorakit.save_adapter(model, tmp_path)
    assert methods["lora"].adapter_bytes == (tmp_path / "adapter_model.safetensors").stat().st_size


def test_inputs_config_json_model_dir_and_default(tiny_model_dir, tmp_path):
    from_dir = plan(str(tiny_model_dir), r=4)
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    from_json = plan(str(tmp_path / "config.json"), r=4)
    assert from_dir.methods == from_json.methods
    real = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    assert from_dir.base_params == sum(p.numel() for p in real.parameters())  # tied head counted once


def test_hundred_billion_parameter_config_plans_on_meta():
    big = dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=126,
               num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)
    result = plan(big, r=16, batch_size=1, seq_len=4096)
    lora = result.methods[1]
    assert result.base_params > 100e9
    # all-linear: r (d_in + d_out) per projection; kv projections are 8 heads x 128 wide
    per_layer = 16 * (2 * (8192 + 8192) + 2 * (8192 + 1024) + 3 * (8192 + 28672))
    assert lora.trainable_params == 126 * per_layer
    assert lora.memory["total_checkpointed"] < lora.memory["total"] < result.methods[0].memory["total"]
    assert result.methods[2].memory["weights"] < 0.3 * lora.memory["weights"]


def test_nf4_weight_bytes_match_a_quantized_model():
    config = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    quantize_model(model, "nf4", torch.bfloat16)
    qlora = plan(config.to_dict(), r=4).methods[2]
    estimated_base = qlora.memory["weights"] - 4 * qlora.trainable_params
    assert estimated_base == pytest.approx(tensor_bytes(model), rel=0.005)


def saved_activation_bytes(model, ids) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward (each storage once, weights excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # sdpa's fused CPU kernel keeps a log-sum-exp, its math fallback the probabilities: pin the one plan counts
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        total, _ = loss_sum(model, ids, torch.ones_like(ids), ids)
    return sum(saved.values())


@pytest.fixture
def default_kernels(monkeypatch):
    """The kernels' default choices (the loss chunk sets what the loss keeps): not what an earlier test or
    this machine's timings picked."""
    from lorakit.core import autotune

    monkeypatch.setenv("LORAKIT_AUTOTUNE", "0")
    autotune.forget_process_decisions()
    yield
    autotune.forget_process_decisions()


SAVED_IN_A_FRESH_PROCESS = """
import json, sys, torch
sys.path[:0] = [sys.argv[1], str(__import__("pathlib").Path(sys.argv[1]).parent)]
from transformers import LlamaConfig, LlamaForCausalLM
import lorakit
from test_plan import saved_activation_bytes
config = LlamaConfig(**json.loads(sys.argv[2]))
torch.manual_seed(0)
model = LlamaForCausalLM(config).to(torch.bfloat16)
lorakit.apply(model, lorakit.LoraConfig(r=8, target_modules=json.loads(sys.argv[3])))
model.train()
print(saved_activation_bytes(model, torch.randint(0, 128, (2, 96))))
"""


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_activation_estimate_matches_what_autograd_saves(targets, default_kernels):
    import subprocess
    import sys
    from pathlib import Path

    config = dict(vocab_size=128, hidden_size=128, intermediate_size=320, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    # measured in a process of its own: what autograd saves must not depend on what earlier tests set up
    out = subprocess.run([sys.executable, "-c", SAVED_IN_A_FRESH_PROCESS, str(Path(__file__).parent),
                          json.dumps(config), json.dumps(targets)], capture_output=True, text=True, check=True)
    estimate = plan(LlamaConfig(**config).to_dict(), r=8, target_modules=targets, batch_size=2, seq_len=96).methods[1]
    assert estimate.memory["activations"] == pytest.approx(int(out.stdout.split()[-1]), rel=0.1)


def test_plan_cli_json(tiny_model_dir, capsys):
    assert main(["plan", str(tiny_model_dir), "--r", "4", "--target-modules", "q_proj,v_proj",
                 "--batch-size", "2", "--seq-len", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["methods"]) == {"full", "lora", "qlora"}
    for method in out["methods"].values():
        assert {"total_params", "trainable_params", "adapter_bytes"} <= set(method)
        assert {"weights", "gradients", "optimizer_states", "activations", "activations_checkpointed",
                "logits", "total", "total_checkpointed"} <= set(method["memory"])
    assert out["methods"]["lora"]["trainable_params"] == 2 * 4 * ((32 + 32) + (32 + 16))
    assert main(["plan", str(tiny_model_dir)]) == 0
    assert "| trainable parameters |" in capsys.readouterr().out


def test_plan_errors(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "missing.json")]) == 1
    assert "missing.json not found" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(LorakitError, match="model_type"):
        plan(str(tmp_path / "config.json"))
    with pytest.raises(LorakitError, match="matched nothing"):
        plan(LLAMA.to_dict(), target_modules=["q_prj"])
    with pytest.raises(LorakitError, match="causal LM"):
        plan({"model_type": "t5", "d_model": 32, "num_heads": 4, "num_layers": 2})


@pytest.mark.parametrize("seq_len", [96, 200], ids=["one block of queries", "two blocks"])
def test_cpu_attention_estimate_matches_what_autograd_saves(default_kernels, seq_len):
    # lorakit's CPU attention keeps the attention probabilities; `--device cpu` counts them
    from lorakit.training.attention import use_fast_cpu_attention

    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=320, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    ids = torch.randint(0, 128, (2, seq_len), generator=torch.Generator().manual_seed(0))

    def saved(fast_attention: bool) -> int:
        torch.manual_seed(0)
        model = LlamaForCausalLM(copy.deepcopy(config)).to(torch.bfloat16)  # switching sets the config's field
        assert not fast_attention or use_fast_cpu_attention(model, measure=False)
        lorakit.apply(model, LoraConfig(r=8, target_modules="all-linear"))
        return saved_activation_bytes(model.train(), ids)

    on_cpu, on_gpu = (plan(config.to_dict(), r=8, batch_size=2, seq_len=seq_len, device=d).methods[1]
                      for d in ("cpu", "cuda"))
    with_fast, with_sdpa = saved(True), saved(False)
    assert on_cpu.memory["activations"] == pytest.approx(with_fast, rel=0.1)
    assert on_gpu.memory["activations"] < 0.9 * with_fast  # the probabilities are a real share: the term matters
    # the term itself: what the fast attention keeps beyond sdpa (fewer probabilities with two blocks of queries)
    assert on_cpu.memory["activations"] - on_gpu.memory["activations"] == pytest.approx(with_fast - with_sdpa, rel=0.1)
