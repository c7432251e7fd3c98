"""An Ollama Modelfile beside the exported files: `FROM` the merged model, or the base plus `ADAPTER`."""
from __future__ import annotations

from pathlib import Path

# Ollama's Go template for ChatML (SmolLM2, Qwen2 ...): the chat template GGUF files carry is Jinja,
# which Ollama does not run, so a known format is spelled out here.
CHATML_TEMPLATE = (
    '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n'
)


def modelfile_text(base: str, adapter: str | None, chat_template: str | None) -> str:
    """The Modelfile's text.

    Args:
        base: what FROM names: the merged GGUF file, or the base model (GGUF file or HF directory).
        adapter: the adapter GGUF file, or None for a merged model.
        chat_template: the model's Jinja chat template; ChatML ones get Ollama's TEMPLATE and stop token.
    """
    lines = [f"FROM {base}"]
    if adapter is not None:
        lines.append(f"ADAPTER {adapter}")
    if chat_template and "<|im_start|>" in chat_template:
        lines += [f'TEMPLATE """{CHATML_TEMPLATE}"""', 'PARAMETER stop "<|im_end|>"']
    return "\n".join(lines) + "\n"


def how_to_run(directory: Path, gguf_name: str, base: str | None) -> str:
    """The printed how-to: llama.cpp's CLI and server, and Ollama."""
    if base is None:
        llama = f"llama-cli -m {directory / gguf_name}"
    else:
        llama = f"llama-cli -m {base} --lora {directory / gguf_name}"
    return "\n".join([
        "run it with llama.cpp:",
        f"  {llama} -cnv",
        "or with Ollama:",
        f"  ollama create my-model -f {directory / 'Modelfile'} && ollama run my-model",
    ])
