"""Per-machine kernel choices: measured once, cached per CPU model + torch version, re-measured on a change."""
import json
import time

import pytest

from lorakit.core import autotune


@pytest.fixture(autouse=True)
def fresh_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    monkeypatch.delenv("LORAKIT_AUTOTUNE", raising=False)
    autotune.forget_process_decisions()
    yield
    autotune.forget_process_decisions()


def counting_candidates(calls):
    def candidate(name, seconds):
        def run():
            calls.append(name)
            time.sleep(seconds)
        return run
    return {"slow": candidate("slow", 0.01), "fast": candidate("fast", 0.0)}


def test_picks_the_fastest_and_caches_it(tmp_path):
    calls = []
    assert autotune.choose("demo", "n8", counting_candidates(calls), repeats=2) == "fast"
    assert calls.count("slow") == 3 and calls.count("fast") == 3  # warm-up + 2 timed runs each
    saved = json.loads((tmp_path / autotune.FILE_NAME).read_text())[autotune.machine_key()]["demo[n8]"]
    assert saved["choice"] == "fast" and saved["seconds"]["slow"] > saved["seconds"]["fast"]

    autotune.forget_process_decisions()  # a new process reads the file and measures nothing
    calls.clear()
    assert autotune.choose("demo", "n8", counting_candidates(calls)) == "fast" and not calls
    assert autotune.decisions()["demo[n8]"]["choice"] == "fast"


def test_another_cpu_or_torch_measures_again(monkeypatch):
    calls = []
    autotune.choose("demo", "n8", counting_candidates(calls), repeats=1)
    for patch in (lambda: monkeypatch.setattr(autotune, "cpu_model", lambda: "Some Other CPU"),
                  lambda: monkeypatch.setattr(autotune.torch, "__version__", "9.9.9")):
        patch()
        autotune.forget_process_decisions()
        calls.clear()
        assert autotune.choose("demo", "n8", counting_candidates(calls), repeats=1) == "fast" and calls


def test_off_switch_and_corrupt_cache(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv("LORAKIT_AUTOTUNE", "0")
    assert autotune.choose("demo", "n8", counting_candidates(calls)) == "slow" and not calls  # the default
    monkeypatch.delenv("LORAKIT_AUTOTUNE")
    (tmp_path / autotune.FILE_NAME).write_text("{not json")
    assert autotune.choose("demo", "n8", counting_candidates(calls), repeats=1) == "fast"
    assert json.loads((tmp_path / autotune.FILE_NAME).read_text())  # rewritten whole


def test_attention_choice_is_one_of_two_equivalent_paths():
    import torch
    from transformers import LlamaConfig

    from lorakit.training.attention import choose_attention

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    assert choose_attention(config, torch.bfloat16, batch=1, seq=16) in ("gemm", "sdpa")
    assert any(k.startswith("cpu_attention[b1 t16 h4/2 d16") for k in autotune.decisions())


def test_cpus_named_alike_are_told_apart_by_family_and_model():
    zen2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 49\nmodel name\t: AMD EPYC\n\nprocessor\t: 1\n"
    zen4 = zen2.replace("23", "25").replace("49", "17")
    assert autotune.describe_cpu(zen2) == "AMD EPYC (family 23, model 49)"
    assert autotune.describe_cpu(zen4) == "AMD EPYC (family 25, model 17)"
    assert autotune.describe_cpu("processor\t: 0\nfeatures\t: fp asimd\n") is None  # no model name: platform's
