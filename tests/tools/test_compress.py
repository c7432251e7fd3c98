"""`lorakit compress`: full rank changes nothing, the reported error is the real one, PEFT loads the result."""
import json

import pytest
import torch
from conftest import input_ids, randomize_lora, tiny_llama
from peft import PeftModel
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig, LorakitError
from lorakit.cli.main import main
from lorakit.tools.compress import compress_adapter
from lorakit.tools.rank import read_factors

# rank/alpha patterns and rsLoRA: the compressed file must fold every module's own scaling into B.
CONFIG = dict(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
              rank_pattern={"layers.1.self_attn.q_proj": 4}, alpha_pattern={"down_proj": 3.0}, use_rslora=True)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def dense_updates(directory) -> dict[str, torch.Tensor]:
    """scaling * B A of every module, from the files alone."""
    factors = read_factors(directory)
    return {name: m.scaling * (m.flat()[0].double() @ m.flat()[1].double()) for name, m in factors.modules.items()}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    model = tiny_llama()
    lorakit.apply(model, LoraConfig(**CONFIG))
    randomize_lora(model, scale=0.3)
    directory = tmp_path_factory.mktemp("source") / "adapter"
    lorakit.save_adapter(model, directory)
    return directory, logits(model, input_ids())


def test_full_rank_changes_nothing(adapter, tmp_path):
    source, expected = adapter
    report = compress_adapter(source, tmp_path / "out", rank=6)
    assert report["total"]["relative_error"] == 0 and report["total"]["params_after"] == report["total"]["params_before"]
    before, after = load_file(source / "adapter_model.safetensors"), load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    for name, update in dense_updates(source).items():
        torch.testing.assert_close(dense_updates(tmp_path / "out")[name], update, atol=1e-7, rtol=1e-6)
    model = lorakit.load_adapter(tiny_llama(), tmp_path / "out")
    torch.testing.assert_close(logits(model, input_ids()), expected, atol=1e-5, rtol=1e-5)


def test_lower_rank_keeps_the_error_it_reports(adapter, tmp_path):
    source, _ = adapter
    report = compress_adapter(source, tmp_path / "out", rank=2)
    old, new = dense_updates(source), dense_updates(tmp_path / "out")
    lost, total = 0.0, 0.0
    for name, m in report["modules"].items():
        assert m["r_after"] == 2 and m["params_after"] < m["params_before"]
        error = float((new[name] - old[name]).norm() / old[name].norm())
        assert error == pytest.approx(m["relative_error"], rel=1e-4) and 0 < error < 1
        # Eckart-Young: nothing of rank 2 is closer than the truncated SVD
        assert error <= float(torch.linalg.svdvals(old[name])[2:].norm() / old[name].norm()) * (1 + 1e-4)
        lost += float((new[name] - old[name]).norm() ** 2)
        total += float(old[name].norm() ** 2)
    assert report["total"]["relative_error"] == pytest.approx((lost / total) ** 0.5, rel=1e-4)


def test_energy_compression_loads_in_peft_with_lorakit_logits(adapter, tmp_path):
    source, _ = adapter
    report = compress_adapter(source, tmp_path / "out", energy=0.8)
    ranks = {m["r_after"] for m in report["modules"].values()}
    assert len(ranks) > 1, "energy selection should give modules different ranks"
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"] == {}
    ids = input_ids()
    ours = logits(lorakit.load_adapter(tiny_llama(), tmp_path / "out"), ids)
    theirs = logits(PeftModel.from_pretrained(tiny_llama(), tmp_path / "out").eval(), ids)
    assert (ours - logits(tiny_llama(), ids)).abs().max() > 1e-3, "the adapter must change the output"
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_cli_reports_and_measures_before_after(tiny_model_dir, task_files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lorakit.apply(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                    base_model_name_or_path=str(tiny_model_dir)))
    randomize_lora(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    _, evals = task_files
    args = ["compress", str(tmp_path / "adapter"), "--rank", "1", "--output", str(tmp_path / "out"),
            "--eval-data", str(evals), "--eval-samples", "2", "--max-new-tokens", "4"]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total"]["r_after"] == 4 and set(out["eval"]) == {"before", "after"}
    assert out["eval"]["before"]["loss"] != out["eval"]["after"]["loss"] and out["eval"]["after"]["exact_match"] is not None
    assert main(args[:-6]) == 0
    assert "**total**" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    ([], "exactly one of"), (["--rank", "2", "--energy", "0.9"], "exactly one of"),
    (["--rank", "0"], "positive"), (["--energy", "1.5"], "energy"),
])
def test_bad_requests_are_refused(adapter, tmp_path, capsys, flags, message):
    source, _ = adapter
    assert main(["compress", str(source), "--output", str(tmp_path / "out"), *flags]) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_output_must_differ_from_source(adapter):
    source, _ = adapter
    with pytest.raises(LorakitError, match="another directory"):
        compress_adapter(source, source, rank=1)
