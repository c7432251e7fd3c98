"""Models by Hub id from the local Hugging Face cache: found offline, recorded by id, a clear error when absent."""
import json

import pytest
import torch

from conftest import put_in_hub_cache
from lorakit.core.errors import LorakitError
from lorakit.training import hub
from lorakit.training.models import load_model, model_config_dict


def test_repo_id_shape():
    assert hub.is_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct") and hub.is_repo_id("org/name.v2")
    for spec in ("default", "/abs/path", "a/b/c", "./org/name", "org/", "model.gguf"):
        assert not hub.is_repo_id(spec)


def test_cached_model_loads_by_id(hub_cache, tiny_model_dir):
    from huggingface_hub import scan_cache_dir
    from transformers import AutoModelForCausalLM

    snapshot = put_in_hub_cache(hub_cache, "lorakit-tests/tiny-llama", tiny_model_dir)
    (repo,) = scan_cache_dir(hub_cache).repos  # huggingface_hub reads the layout as its own
    assert repo.repo_id == "lorakit-tests/tiny-llama" and set(repo.refs) == {"main"} and repo.nb_files > 3

    loaded = load_model("lorakit-tests/tiny-llama", dtype=torch.float32, device="cpu", fast_cpu_attention=False)
    assert loaded.source == "lorakit-tests/tiny-llama"
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert model_config_dict("lorakit-tests/tiny-llama")["num_hidden_layers"] == 2
    assert hub.cached_snapshot("lorakit-tests/tiny-llama") == snapshot


def test_training_records_the_id(hub_cache, tiny_model_dir, task_files, tmp_path):
    from lorakit.cli.main import main

    put_in_hub_cache(hub_cache, "lorakit-tests/tiny-llama", tiny_model_dir)
    out = tmp_path / "run"
    assert main(["train", "--model", "lorakit-tests/tiny-llama", "--data", str(task_files[0]), "--output", str(out),
                 "--max-steps", "1", "--batch-size", "2", "--eval-samples", "0", "--precision", "fp32",
                 "--quiet"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "lorakit-tests/tiny-llama"


def test_absent_model_names_the_cache(hub_cache):
    with pytest.raises(LorakitError) as error:
        load_model("org/absent")
    assert f"model in the local Hugging Face cache ({hub_cache})" in str(error.value)
    assert "`hf download org/absent`" in str(error.value)


def test_remote_code_stays_off_unless_asked(hub_cache, tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    # an architecture transformers does not know: only the shipped code could build it
    config.update(model_type="lorakit_custom", auto_map={"AutoConfig": "custom.CustomConfig",
                                                         "AutoModelForCausalLM": "custom.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text("raise RuntimeError('remote code ran')\n")
    put_in_hub_cache(hub_cache, "org/custom", folder)
    with pytest.raises(LorakitError, match="ships its own Python code.*--trust-remote-code"):
        load_model("org/custom")
