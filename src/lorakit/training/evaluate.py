"""Measuring a model: held-out loss and perplexity, greedy-generation exact match, the forgetting probe.

`evaluate` is the one evaluation: a run's before and after (`lorakit train`, hence `lorakit sweep`),
`lorakit eval` (`run_eval`) and `lorakit compress --eval-data` all measure with it.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lorakit.training.data.batching import collate
from lorakit.training.data.render import prompts_and_references
from lorakit.training.data.sets import EvalSet, load_eval_set
from lorakit.training.loading import load_with_adapter
from lorakit.training.loss import loss_sum
from lorakit.training.tasks import forgetting_probe_texts


@dataclass
class EvalResult:
    """What one evaluation measured; fields that were not measured stay None."""

    loss: float | None = None
    perplexity: float | None = None
    exact_match: float | None = None
    probe_perplexity: float | None = None
    n_examples: int = 0
    samples: list[tuple[str, str]] = field(default_factory=list)  # (reference, generated), a few

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def mean_loss(model: nn.Module, examples: list[dict], pad_id: int, device: torch.device, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy over the labelled tokens of `examples`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    # Sorting by length keeps padding (wasted compute) small.
    ordered = sorted(examples, key=lambda e: len(e["input_ids"]))
    for start in range(0, len(ordered), batch_size):
        batch = {k: v.to(device) for k, v in collate(ordered[start:start + batch_size], pad_id).items()}
        s, n = loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        total += float(s)
        count += n
    model.train(was_training)
    return total / max(count, 1)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """eos plus the chat template's end-of-turn token, whichever exist."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer: Any, prompts: list[str], device: torch.device,
    max_new_tokens: int = 64, batch_size: int = 32,
) -> list[str]:
    """Greedy completions of already-rendered prompts, batched with left padding."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(tokenizer))
            new = out[:, enc["input_ids"].shape[1]:]
            outputs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def exact_match(prediction: str, reference: str) -> bool:
    """Whether ``prediction`` equals ``reference`` after stripping surrounding whitespace.

    Args:
        prediction: generated text.
        reference: expected text.

    Returns:
        True when both are equal once stripped.
    """
    return prediction.strip() == reference.strip()


def exact_match_rate(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference after stripping whitespace."""
    return sum(exact_match(p, r) for p, r in zip(predictions, references)) / max(len(references), 1)


@torch.no_grad()
def text_perplexity(model: nn.Module, tokenizer: Any, texts: list[str], device: torch.device,
                    max_len: int = 256, batch_size: int = 8) -> float:
    """Perplexity of plain `texts` (each cut into max_len-token pieces), for the forgetting probe."""
    examples = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), max_len):
            piece = ids[start:start + max_len]
            if len(piece) > 1:
                examples.append({"input_ids": piece, "labels": list(piece)})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return math.exp(mean_loss(model, examples, pad_id, device, batch_size))


def evaluate(model: nn.Module, tokenizer: Any, data: EvalSet, device: torch.device, exact_match_samples: int = 100,
             max_new_tokens: int = 48, probe: bool = True) -> EvalResult:
    """Held-out loss and perplexity, greedy-generation exact match and the forgetting probe of `model`.

    Args:
        model: the model as it is now (base, or base + adapter); its train/eval mode is restored after.
        tokenizer: its tokenizer.
        data: the held-out set.
        exact_match_samples: how many of the set's first records to generate for; 0, or text data: none.
        max_new_tokens: generation length.
        probe: also measure perplexity on the forgetting probe (general text outside the training data).

    Returns:
        The measurements; exact match (and a few sample generations) only for instruction/chat data.
    """
    loss = mean_loss(model, data.examples, tokenizer.pad_token_id, device)
    result = EvalResult(loss=loss, perplexity=math.exp(loss), n_examples=len(data.examples))
    if data.format in ("instruction", "chat") and exact_match_samples > 0:
        pairs = prompts_and_references(data.records[:exact_match_samples], tokenizer, data.format)
        references = [r for _, r in pairs]
        predictions = generate(model, tokenizer, [p for p, _ in pairs], device, max_new_tokens)
        result.exact_match = exact_match_rate(predictions, references)
        result.samples = list(zip(references[:3], predictions[:3]))
    if probe:
        result.probe_perplexity = text_perplexity(model, tokenizer, forgetting_probe_texts(), device)
    return result


# ---- lorakit eval -----------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    data: str | None = None
    """Evaluation data (.jsonl/.csv/.txt); omitted: the built-in task's held-out set."""
    model: str | None = None
    """Base model; omitted: the adapter's recorded base, else the embedded default."""
    adapter: str | None = None
    """Adapter directory (PEFT format) to evaluate on top of the base."""
    format: Literal["auto", "text", "instruction", "chat"] = "auto"
    """Data format."""
    max_seq_len: int = 512
    """Longest sample in tokens."""
    eval_samples: int = 100
    """Samples for greedy-generation exact match."""
    max_new_tokens: int = 48
    """Generation length."""
    json: bool = False
    """Print a JSON object instead of a table."""
    device: str | None = None
    """cpu, cuda ..."""
    quantize: Literal["none", "nf4", "int8"] = "none"
    """Hold the base's block linears in 4-bit NF4 or int8, as a QLoRA adapter was trained."""


def run_eval(cfg: EvalConfig) -> dict:
    """`lorakit eval`: loss, perplexity, forgetting probe and (instruction/chat data) exact match, printed.

    Args:
        cfg: the command's options.

    Returns:
        The measurements (`EvalResult` without the sample generations).

    Raises:
        LorakitError: the model, adapter or data cannot be loaded.
    """
    loaded = load_with_adapter(cfg.model, cfg.adapter, cfg.device, quantize=cfg.quantize)
    data = load_eval_set(cfg.data, loaded.tokenizer, cfg.format, cfg.max_seq_len, builtin_samples=cfg.eval_samples)
    result = evaluate(loaded.model, loaded.tokenizer, data, loaded.model.device, cfg.eval_samples, cfg.max_new_tokens)
    out = {k: v for k, v in result.to_dict().items() if k != "samples"}
    if cfg.json:
        print(json.dumps(out, indent=2))
    else:
        for key, value in out.items():
            print(f"{key:<18} {value}")
    return out
