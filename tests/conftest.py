"""Tiny models built from transformers configs (no downloads), and helpers that make LoRA updates non-zero."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


@torch.no_grad()
def randomize_lora(model, seed: int = 1, scale: float = 0.1) -> None:
    """Give every LoRA factor (and saved module) random values, so B != 0 and checks can fail."""
    g = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            param.copy_(torch.randn(param.shape, generator=g) * scale)


# One record of each kind the data pipeline reads (lorakit.training.data), shared by its tests.
INSTRUCTION_RECORD = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
CHAT_RECORD = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome"},
    ]
}


def write_file(directory, name: str, text: str):
    """Write `text` (UTF-8) to directory/name and return the path."""
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(*rows: object) -> str:
    """Rows as JSON Lines."""
    import json

    return "".join(json.dumps(row) + "\n" for row in rows)


def input_ids(batch: int = 2, seq: int = 12, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def ids():
    return input_ids()


@pytest.fixture(scope="session")
def smollm_tokenizer():
    """The embedded SmolLM2 tokenizer (ChatML template included), read from the GGUF file."""
    from transformers import AutoTokenizer

    from lorakit.training.models import default_gguf_path

    path = default_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def smollm_tokenizer_without_template(smollm_tokenizer):
    """The same tokenizer without a chat template, to exercise the Alpaca-style fallback."""
    import copy

    plain = copy.deepcopy(smollm_tokenizer)
    plain.chat_template = None
    return plain


def save_tiny_llama(directory, tokenizer, hidden_size: int):
    """A 2-layer random Llama (seed 0) with `tokenizer`'s vocabulary, saved with it as a HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_tokenizer):
    """A 2-layer random Llama with SmolLM2's vocabulary and tokenizer, saved as a HF directory."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm_tokenizer, hidden_size=32)


@pytest.fixture(scope="session")
def tiny_model_dir64(tmp_path_factory, smollm_tokenizer):
    """tiny_model_dir's model, 64 wide (NF4 blocks fit its rows on the CPU)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-64"), smollm_tokenizer, hidden_size=64)


@pytest.fixture(scope="session")
def task_files(tmp_path_factory):
    """The built-in task written as JSONL: (train file, eval file), small."""
    import json

    from lorakit.training.tasks import builtin_task

    train, evals = builtin_task(n_train=48, n_eval=8, seed=0)
    directory = tmp_path_factory.mktemp("task")
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory / "train.jsonl", directory / "eval.jsonl"


def put_in_hub_cache(cache, repo_id: str, folder, repo_type: str = "model"):
    """Lay `folder`'s files into a Hugging Face Hub cache as a download does: blobs named by their sha256,
    snapshots/<commit>/ of relative symlinks to them, refs/main naming the commit. Returns the snapshot folder."""
    import hashlib
    from pathlib import Path

    repo = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    commit = hashlib.sha1("".join(str(p.relative_to(folder)) for p in files).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for file in files:
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face Hub cache that huggingface_hub (and so lorakit) uses for this test."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read once at import; the env is for subprocesses
    return cache
