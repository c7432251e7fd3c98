"""`lorakit export` and `lorakit train --export` from the command line."""
from __future__ import annotations

import pytest
from gguf_fixtures import (  # noqa: F401 (fixtures)
    PROMPTS,
    gguf_home,
    llama_cpp,
    llama_cpp_logits,
    tiny_adapters,
    tiny_gguf,
    tiny_hf_dir,
)

from lorakit.cli.main import main

pytest.importorskip("llama_cpp")


def test_cli_export_writes_gguf_and_modelfile_and_says_how_to_run(tiny_gguf, tiny_adapters, tmp_path, capsys):
    out = tmp_path / "gguf"
    assert main(["export", str(tiny_adapters["rslora"]), "--to", "gguf", "--outtype", "q8_0", "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "adapter-q8_0.gguf"]
    printed = capsys.readouterr().out
    assert f"--lora {out / 'adapter-q8_0.gguf'}" in printed and "ollama create" in printed
    assert main(["export", str(tiny_adapters["rslora"]), "--merged", "--output", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model-f16.gguf").is_file()


def test_cli_export_names_its_missing_arguments(capsys):
    assert main(["export", "somewhere"]) == 1
    assert "--output DIR" in capsys.readouterr().err


def test_train_with_export_gguf_writes_an_adapter_llama_cpp_loads(tiny_gguf, task_files, tmp_path):
    train, _ = task_files
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_gguf), "--data", str(train), "--output", str(run), "--max-steps", "1",
                 "--eval-samples", "0", "--precision", "fp32", "--export", "gguf", "--quiet"]) == 0
    gguf_file = run / "gguf" / "adapter-f16.gguf"
    assert (run / "gguf" / "Modelfile").is_file()
    with llama_cpp(tiny_gguf, gguf_file) as llm:
        assert llama_cpp_logits(llm, PROMPTS[0]).shape[0] == len(PROMPTS[0])


def test_train_export_gguf_refuses_methods_an_adapter_file_cannot_hold(tmp_path, capsys):
    assert main(["train", "--method", "ia3", "--export", "gguf", "--output", str(tmp_path / "run")]) == 1
    assert "--export gguf-merged" in capsys.readouterr().err
