"""A GGUF file's key-value metadata: carried over from a base GGUF file, or built from a Hugging Face directory.

From a GGUF base everything is kept (tokenizer, chat template, special tokens, hyper-parameters, names)
except what describes the tensors themselves (`general.file_type`, `general.quantization_version`).
From a Hugging Face directory the hyper-parameters come from config.json and the tokenizer from
tokenizer.json through gguf-py's vocab readers (GPT-2-style byte-level BPE only).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from lorakit.core.errors import LorakitError

# Keys that describe the tensors, not the model: rewritten for the new file. `GGUF.*` are the reader's own.
NOT_CARRIED = ("general.architecture", "general.file_type", "general.quantization_version")

# llama.cpp splits text before BPE with a per-model regex it knows by name (`tokenizer.ggml.pre`). The name
# is found from tokenizer.json's pre_tokenizer section (sha256 of its canonical JSON); add rows as tested.
PRE_TOKENIZERS: dict[str, str] = {
    # a bare ByteLevel pre-tokenizer with GPT-2's regex (as transformers writes a GGUF file's gpt2 tokenizer)
    "baad9354616c54e28804f1ac4dc6f27c3032867d2da3f9106a8d12ac859680f0": "gpt-2",
}

KeyValues = list[tuple[str, Any, Any, Any]]  # (key, value, GGUFValueType, array element type or None)


def base_key_values(gguf_path: str | Path, keep: Callable[[str], bool] = lambda key: True) -> KeyValues:
    """The metadata of a GGUF file, except NOT_CARRIED, for the keys `keep` accepts."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    out: KeyValues = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in NOT_CARRIED or not keep(key):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        out.append((key, field.contents(), vtype, sub_type))
    return out


def hyperparameters(writer: Any, config: dict[str, Any]) -> None:
    """Write a llama-family config's shape into `writer` (the keys llama.cpp's LLAMA and QWEN2 graphs read).

    Raises:
        LorakitError: rope scaling lorakit does not write.
    """
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise LorakitError(f"rope_type {rope.get('rope_type')!r} is not written by lorakit's GGUF export; "
                           f"only models with the default rotary embedding are supported.")
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's name for tokenizer.json's pre-tokenizer, from PRE_TOKENIZERS; None if unknown."""
    section = json.dumps(tokenizer_json.get("pre_tokenizer"), sort_keys=True)
    return PRE_TOKENIZERS.get(hashlib.sha256(section.encode()).hexdigest())


def write_hf_tokenizer(writer: Any, model_dir: str | Path, pre: str | None) -> None:
    """Write a Hugging Face directory's byte-level BPE tokenizer (tokens, types, merges, special ids, chat template).

    Args:
        pre: llama.cpp's pre-tokenizer name; None: look it up in PRE_TOKENIZERS.

    Raises:
        LorakitError: no byte-level BPE tokenizer.json, or a pre-tokenizer lorakit cannot name.
    """
    import gguf

    model_dir = Path(model_dir)
    try:
        vocab = gguf.vocab.BpeVocab(model_dir)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise LorakitError(f"{model_dir}: GGUF export reads byte-level BPE tokenizers from tokenizer.json ({e}); "
                           f"convert this model with llama.cpp's convert_hf_to_gguf.py instead.") from e
    if pre is None:
        pre = pre_tokenizer_name(json.loads((model_dir / "tokenizer.json").read_text()))
    if pre is None:
        raise LorakitError(f"{model_dir}: lorakit does not know llama.cpp's name for this tokenizer's pre-tokenizer; "
                           f"pass it with --tokenizer-pre (e.g. llama-bpe, qwen2, smollm, gpt-2; see llama.cpp's "
                           f"convert_hf_to_gguf_update.py).")
    tokens, types = [], []
    for text, _score, kind in vocab.all_tokens():
        tokens.append(text)
        types.append(kind)
    # special tokens that are also in the BPE vocab (<|im_start|> ...) are control tokens to llama.cpp too
    for added in json.loads((model_dir / "tokenizer.json").read_text()).get("added_tokens") or []:
        if added.get("special") and added["id"] < len(types):
            types[added["id"]] = gguf.TokenType.CONTROL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)
