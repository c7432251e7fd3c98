"""QLoRA: NF4 / int8 frozen bases (bitsandbytes, on the CPU here): error bounds, exact LoRA gradients on top,
adapters across quantized and unquantized bases, the merge path, and `lorakit train|eval|merge --quantize`."""
import shutil

import pytest
import torch
from conftest import input_ids, randomize_lora, tiny_llama
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import LoraConfig, LorakitError
from lorakit.cli.main import main
from lorakit.core.layers import is_quantized
from lorakit.core.quantize import (
    dequantize_model,
    dequantized_weight,
    quantizable_linears,
    quantize_model,
    tensor_bytes,
)
from lorakit.methods.lora import LoraOptions
from lorakit.training.config import TrainConfig

MODES = ["nf4", "int8"]


def tiny_llama64(seed: int = 0, dtype=torch.float32):
    """A 2-layer Llama whose linears are 64 or 128 wide: NF4 blocks of 64 fit its rows (see quantize_model)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def quantized_lora(mode: str, dtype=torch.float32):
    model = quantize_model(tiny_llama64(dtype=dtype), mode, dtype)
    lorakit.apply(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora(model)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_round_trip_error_bounds(mode, dtype):
    reference, model = tiny_llama64(dtype=dtype), quantize_model(tiny_llama64(dtype=dtype), mode, dtype)
    for name, linear in quantizable_linears(reference):
        W, Wq = linear.weight.float(), dequantized_weight(model.get_submodule(name))
        if mode == "nf4":
            # NF4's widest code gap is 1 - 0.723 (half: 0.139) of the block's absmax, which is itself
            # stored in 8 bits (double quantization): the error stays under 0.17 x absmax per 64-block.
            blocks = W.flatten().view(-1, 64)
            error = (Wq.flatten().view(-1, 64) - blocks).abs()
            assert (error <= 0.17 * blocks.abs().amax(1, keepdim=True)).all(), name
            assert (Wq - W).norm() / W.norm() < 0.11
        else:
            # int8: round to nearest of 127 steps per row absmax (half a step), after an fp16 cast.
            assert ((Wq - W).abs() <= W.abs().amax(1, keepdim=True) * (0.5 / 127 + 2 ** -10)).all(), name
            assert (Wq - W).norm() / W.norm() < 0.01


def test_quantizes_the_block_linears_only_and_halves_memory():
    bf16 = tiny_llama64(dtype=torch.bfloat16)
    model = quantize_model(tiny_llama64(dtype=torch.bfloat16), "nf4", torch.bfloat16)
    names = {n for n, m in model.named_modules() if is_quantized(m)}
    assert names == {n for n, _ in quantizable_linears(bf16)} and len(names) == 14
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    assert type(model.model.embed_tokens) is nn.Embedding
    assert tensor_bytes(model) <= 0.5 * tensor_bytes(bf16)
    count = lambda m: lorakit.summary(m, print_summary=False).total_params  # noqa: E731
    assert count(model) == count(bf16) == count(quantize_model(tiny_llama64(), "int8"))  # weights, not bytes
    assert quantize_model(bf16, "none") is bf16 and not any(is_quantized(m) for m in bf16.modules())


@pytest.mark.parametrize("mode", MODES)
def test_lora_gradients_through_quantized_base_are_exact(mode):
    ids = input_ids(seq=16)
    model = quantized_lora(mode)
    # the reference holds the same dequantized weights in plain fp32 linears
    reference = dequantize_model(quantized_lora(mode), torch.float32)
    assert not any(is_quantized(m) for m in reference.modules())
    logits(model, ids)  # an eval-mode forward first: training after it must still get its gradients
    for m in (model, reference):
        m.train()
        m(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    reference_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads.keys() == reference_grads.keys() and len(grads) == 28
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    # NF4 multiplies with the dequantized weight; LLM.int8() also rounds the activations to int8
    tolerance = 1e-4 if mode == "nf4" else 0.05
    for name, grad in grads.items():
        assert (grad - reference_grads[name]).norm() <= tolerance * reference_grads[name].norm(), name


def test_training_on_nf4_base_lowers_the_loss():
    ids = input_ids(batch=4, seq=16)
    model = quantize_model(tiny_llama64(dtype=torch.bfloat16), "nf4", torch.bfloat16)
    lorakit.apply(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("mode", MODES)
def test_adapter_loads_across_quantized_and_unquantized_bases(mode, tmp_path):
    ids = input_ids(seq=16)
    quantized = quantized_lora(mode)
    lorakit.save_adapter(quantized, tmp_path / "qlora")
    # the file is a plain PEFT LoRA: it loads onto the unquantized base ...
    plain = lorakit.load_adapter(tiny_llama64(), tmp_path / "qlora")
    lorakit.save_adapter(plain, tmp_path / "again")
    first, again = load_file(tmp_path / "qlora" / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    # ... and onto a quantized base, giving back exactly the model that saved it
    reloaded = lorakit.load_adapter(quantize_model(tiny_llama64(), mode, torch.float32), tmp_path / "again")
    assert torch.equal(logits(reloaded, ids), logits(quantized, ids))
    # the quantized and unquantized bases differ only by the quantization error
    expected, got = logits(plain, ids), logits(quantized, ids)
    assert (got - expected).norm() < (0.2 if mode == "nf4" else 0.02) * expected.norm()


def test_merge_refuses_quantized_base_and_merge_and_unload_dequantizes():
    ids = input_ids(seq=16)
    model = quantized_lora("nf4")
    before = logits(model, ids)
    with pytest.raises(LorakitError, match="merge_and_unload"):
        lorakit.merge(model)
    assert torch.equal(logits(model, ids), before)
    merged = lorakit.merge_and_unload(model)
    linears = [m for _, m in merged.named_modules() if isinstance(m, nn.Linear)]
    assert all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in linears) and len(linears) == 15
    assert torch.allclose(logits(merged, ids), before, atol=1e-4, rtol=1e-4)


def test_quantize_errors():
    with pytest.raises(LorakitError, match="quantize='nf8' is invalid"):
        quantize_model(tiny_llama64(), "nf8")
    with pytest.raises(LorakitError, match="before adding adapters"):
        quantize_model(lorakit.apply(tiny_llama64(), LoraConfig(target_modules=["q_proj"])), "int8")
    with pytest.raises(LorakitError, match="divisible by 64"):
        quantize_model(tiny_llama(), "nf4")  # hidden size 32
    with pytest.raises(LorakitError, match="not a bitsandbytes"):
        dequantized_weight(nn.Linear(4, 4))
    with pytest.raises(LorakitError, match="pissa"):
        TrainConfig(quantize="nf4", lora=LoraOptions(init_lora_weights="pissa"))


# ---- the command line ---------------------------------------------------------------------------------
FAST = ["--eval-samples", "2", "--max-new-tokens", "4", "--warmup-steps", "1", "--batch-size", "4", "--r", "4"]


def test_cli_train_resume_eval_merge_on_nf4_base(tiny_model_dir64, task_files, tmp_path, capsys):
    train, _ = task_files
    common = ["train", "--model", str(tiny_model_dir64), "--data", str(train), "--quantize", "nf4", *FAST,
              "--max-steps", "4", "--save-every", "2", "--gradient-checkpointing"]
    run = tmp_path / "run"
    assert main([*common, "--output", str(run)]) == 0
    shutil.copytree(run / "adapter", tmp_path / "uninterrupted")
    # as if stopped after step 2: resuming from its checkpoint must end at the same adapter
    shutil.rmtree(run / "adapter")
    (run / "checkpoints" / "latest").write_text("step-00000002")
    assert main([*common, "--output", str(run), "--resume"]) == 0
    a = load_file(tmp_path / "uninterrupted" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume on a quantized base is exact"
    assert any(t.abs().sum() > 0 for k, t in a.items() if "lora_B" in k)

    adapter = str(run / "adapter")
    assert main(["eval", "--model", str(tiny_model_dir64), "--adapter", adapter, "--quantize", "nf4",
                 "--eval-samples", "2", "--max-new-tokens", "4"]) == 0
    assert "exact_match" in capsys.readouterr().out
    assert main(["generate", "--model", str(tiny_model_dir64), "--adapter", adapter, "--quantize", "nf4",
                 "--prompt", "hi", "--max-new-tokens", "4"]) == 0

    # merge onto the base as training saw it (NF4, dequantized), written in fp32
    assert main(["merge", "--model", str(tiny_model_dir64), "--adapter", adapter, "--quantize", "nf4",
                 "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = quantize_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir64), "nf4", torch.float32)
    lorakit.load_adapter(base, adapter)
    ids = input_ids(seq=16, vocab=1000)
    assert torch.allclose(logits(merged, ids), logits(base.eval(), ids), atol=1e-4, rtol=1e-4)


def test_bench_lorakit_configuration_on_nf4_base(tiny_model_dir64):
    from lorakit.tools.bench import BenchTrainConfig, run_one

    common = dict(model=str(tiny_model_dir64), batch_size=1, seq_len=16, steps=1, warmup=0, device="cpu")
    plain = run_one("lorakit", BenchTrainConfig(**common))
    nf4 = run_one("lorakit", BenchTrainConfig(**common, quantize="nf4"))
    assert 0 < nf4["model_bytes"] < plain["model_bytes"]
    assert 0 < nf4["step_peak_mem_bytes"] <= nf4["peak_mem_bytes"]
