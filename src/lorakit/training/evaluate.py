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

from lorakit.core.adapters import disable_adapters
from lorakit.training.data.batching import collate
from lorakit.training.data.render import prompts_and_references
from lorakit.training.data.sets import EvalSet, load_eval_set
from lorakit.training.generation import generate
from lorakit.training.knowledge import behaviour_answers, compare_behaviour
from lorakit.training.loading import load_with_adapter
from lorakit.training.loss import loss_sum
from lorakit.training.tasks import forgetting_probe_texts


@dataclass
class EvalResult:
    """What one evaluation measured; fields that were not measured stay None."""

    n_examples: int = 0
    loss: float | None = None
    perplexity: float | None = None
    exact_match: float | None = None
    probe_perplexity: float | None = None
    samples: list[tuple[str, str]] = field(default_factory=list)  # (reference, generated), a few
    behaviour_answers: list[str] | None = None  # greedy answers to the general instructions (behaviour probe)

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
             max_new_tokens: int = 48, probe: bool = True, behaviour: bool = True) -> EvalResult:
    """Held-out loss and perplexity, greedy-generation exact match and the forgetting probe of `model`.

    Args:
        model: the model as it is now (base, or base + adapter); its train/eval mode is restored after.
        tokenizer: its tokenizer.
        data: the held-out set.
        exact_match_samples: how many of the set's first records to generate for; 0, or text data: none.
        max_new_tokens: generation length.
        probe: also measure perplexity on the forgetting probe (general text outside the training data).
        behaviour: also answer the behaviour probe's general instructions (`lorakit.training.knowledge`).

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
    if behaviour:
        result.behaviour_answers = behaviour_answers(model, tokenizer, device)
    return result


# ---- lorakit eval -----------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    data: str | None = None
    """Evaluation data (the forms --data of train takes); omitted: the built-in task's held-out set."""
    split: str = "train"
    """Split of --data (a dataset name or a save_to_disk folder)."""
    model: str | None = None
    """Base model; omitted: the adapter's recorded base, else the embedded default."""
    adapter: str | None = None
    """Adapter directory (PEFT format) to evaluate on top of the base."""
    format: Literal["auto", "text", "instruction", "chat", "sharegpt"] = "auto"
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
    probe: bool = False
    """With --adapter: also measure what the adapter kept of the base (forgetting probe perplexity and
    behaviour probe answers, adapter vs base)."""


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
    data = load_eval_set(cfg.data, loaded.tokenizer, cfg.format, cfg.max_seq_len, builtin_samples=cfg.eval_samples,
                         split=cfg.split)
    device, tokenizer = loaded.model.device, loaded.tokenizer
    result = evaluate(loaded.model, tokenizer, data, device, cfg.eval_samples, cfg.max_new_tokens, behaviour=cfg.probe)
    out = {k: v for k, v in result.to_dict().items() if k not in ("samples", "behaviour_answers")}
    if cfg.probe and cfg.adapter:
        out["kept"] = knowledge_kept(loaded.model, tokenizer, device, result)
    if cfg.json:
        print(json.dumps(out, indent=2))
    else:
        for key, value in out.items():
            print(f"{key:<18} {value}" if key != "kept" else f"{key:<18} " + ", ".join(
                f"{k}={v}" for k, v in value.items() if k != "examples"))
    return out


def knowledge_kept(model: nn.Module, tokenizer: Any, device: torch.device, adapted: EvalResult) -> dict[str, Any]:
    """Both probes of `adapted` (measured with the adapter on) against the same model with its adapters off.

    Returns:
        {"forgetting_pct": probe perplexity rise in percent, "behaviour_unchanged", "token_agreement",
        "examples"}.
    """
    with disable_adapters(model):
        base_ppl = text_perplexity(model, tokenizer, forgetting_probe_texts(), device)
        base_answers = behaviour_answers(model, tokenizer, device)
    kept = compare_behaviour(base_answers, adapted.behaviour_answers, tokenizer)
    return {"forgetting_pct": 100 * (adapted.probe_perplexity - base_ppl) / base_ppl,
            "behaviour_unchanged": kept.unchanged, "token_agreement": kept.token_agreement,
            "examples": kept.examples}
