"""What a fine-tune kept: the behaviour probe, the preservation loss (--preserve) and the forgetting guard
(--max-forgetting).

- Behaviour kept: greedy answers to `GENERAL_INSTRUCTIONS` before vs after; the share of answers left
  unchanged and the mean token-level agreement.
- Preservation: KL(base || adapted) of next-token distributions on general text — stdlib docstrings of
  other modules than the forgetting probe's, and the base's own answers to general instructions other
  than the behaviour probe's — the base distribution from the same model with its adapters switched
  off: no second copy of the model.
- The guard: at probe points it records forgetting and the held-out task loss and keeps the best
  adapter state whose forgetting stays within budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapters import disable_adapters
from lorakit.core.errors import LorakitError
from lorakit.training.general_prompts import GENERAL_INSTRUCTIONS
from lorakit.training.generation import generate, generate_ids
from lorakit.training.loss import no_cache_kwargs
from lorakit.training.preserve_prompts import preservation_instructions
from lorakit.training.tasks import (
    PRESERVE_MODULES,
    docstring_texts,
    forgetting_probe_texts,
)

BEHAVIOUR_MAX_NEW_TOKENS = 32
# --preserve's chat half: the base's answers up to 48 tokens, past the probe's 32, where answers drift most
CHAT_ANSWER_TOKENS = 48


# ---- behaviour kept ----------------------------------------------------------------------------------
def render_instruction(tokenizer: Any, instruction: str) -> str:
    """`instruction` as the model's chat template renders a user turn, ready for the answer."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                             add_generation_prompt=True)
    return f"Question: {instruction}\nAnswer:"


def behaviour_answers(model: nn.Module, tokenizer: Any, device: torch.device,
                      max_new_tokens: int = BEHAVIOUR_MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers to every general instruction, in `GENERAL_INSTRUCTIONS` order."""
    prompts = [render_instruction(tokenizer, q) for q in GENERAL_INSTRUCTIONS]
    return generate(model, tokenizer, prompts, device, max_new_tokens)


@dataclass
class BehaviourKept:
    """Answers before vs after: `unchanged` share, mean `token_agreement`, a few side-by-side examples."""

    unchanged: float
    token_agreement: float
    n_prompts: int
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (instruction, before, after)

    def to_dict(self) -> dict[str, Any]:
        return {"unchanged": self.unchanged, "token_agreement": self.token_agreement, "n_prompts": self.n_prompts,
                "examples": [list(e) for e in self.examples]}


def token_agreement(before: list[int], after: list[int]) -> float:
    """Share of positions where two token sequences agree, over the longer one (1.0 for two empty ones)."""
    longest = max(len(before), len(after))
    return sum(a == b for a, b in zip(before, after)) / longest if longest else 1.0


def compare_behaviour(before: list[str], after: list[str], tokenizer: Any, n_examples: int = 4) -> BehaviourKept:
    """How many answers stayed the same, and how closely the rest agree token by token.

    Raises:
        LorakitError: the two answer lists differ in length (they must answer the same prompts).
    """
    if len(before) != len(after):
        raise LorakitError(f"behaviour probe: {len(before)} answers before but {len(after)} after; "
                           "measure both with behaviour_answers on the same model family.")
    same = [b == a for b, a in zip(before, after)]
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    agreement = [token_agreement(encode(b), encode(a)) for b, a in zip(before, after)]
    changed = [i for i, s in enumerate(same) if not s]
    shown = (changed + [i for i, s in enumerate(same) if s])[:n_examples]
    examples = [(GENERAL_INSTRUCTIONS[i] if i < len(GENERAL_INSTRUCTIONS) else "", before[i], after[i]) for i in shown]
    n = max(len(before), 1)
    return BehaviourKept(sum(same) / n, sum(agreement) / n, len(before), examples)


# ---- preservation ------------------------------------------------------------------------------------
def preservation_texts(max_chars: int = 60000) -> list[str]:
    """General prose for --preserve: docstrings of `PRESERVE_MODULES`, never a paragraph of the probe's."""
    return docstring_texts(PRESERVE_MODULES, max_chars, exclude=frozenset(forgetting_probe_texts()))


def preservation_batches(tokenizer: Any, seq_len: int = 128) -> list[list[int]]:
    """The preservation text as token pieces of at most `seq_len` tokens (pieces of one token dropped)."""
    pieces = []
    for text in preservation_texts():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces += [ids[i:i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i:i + seq_len]) > 1]
    if not pieces:
        raise LorakitError("no preservation text could be tokenized; --preserve needs the stdlib docstrings.")
    return pieces


def kl_to_base(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of KL(p_base || p_adapted) for the next-token distributions.

    The base distribution comes from the same model with its adapters switched off (no gradient); the
    adapted one carries the gradient to the adapter. Shapes: input_ids/attention_mask (B, T).
    """
    no_cache = no_cache_kwargs(model)
    with torch.no_grad(), disable_adapters(model):
        base_logp = F.log_softmax(model(input_ids=input_ids, attention_mask=attention_mask, **no_cache).logits.float(),
                                  dim=-1)
    logp = F.log_softmax(model(input_ids=input_ids, attention_mask=attention_mask, **no_cache).logits.float(), dim=-1)
    per_token = (base_logp.exp() * (base_logp - logp)).sum(-1)  # (B, T)
    mask = attention_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def chat_preservation_pieces(model: nn.Module, tokenizer: Any, device: torch.device,
                             max_new_tokens: int = CHAT_ANSWER_TOKENS) -> list[list[int]]:
    """Each preservation instruction as a rendered user turn followed by the base model's own greedy answer
    (adapters switched off), as token ids: the chat behaviour --preserve keeps."""
    prompts = [render_instruction(tokenizer, q) for q in preservation_instructions()]
    with disable_adapters(model):
        answers = generate_ids(model, tokenizer, prompts, device, max_new_tokens)
    return [tokenizer(p, add_special_tokens=False)["input_ids"] + a for p, a in zip(prompts, answers)]


class PreservationLoss:
    """`weight` x KL to the base on one preservation micro-batch per optimizer step.

    Each micro-batch holds `prose_rows` pieces of general prose (`preservation_batches`) and `chat_rows`
    general instructions answered by the base (`chat_preservation_pieces`): prose keeps the language
    model, the answers keep the chat behaviour. The micro-batch of step s is a deterministic function of s,
    so a resumed run sees the same ones.
    """

    def __init__(self, tokenizer: Any, weight: float, chat_pieces: list[list[int]] | None = None,
                 prose_rows: int = 1, chat_rows: int = 2, seq_len: int = 128) -> None:
        if weight < 0 or not math.isfinite(weight):
            raise LorakitError(f"--preserve must be a finite weight >= 0, got {weight}.")
        self.weight = weight
        self.sources = [(preservation_batches(tokenizer, seq_len), prose_rows)]
        if chat_pieces and chat_rows:
            self.sources.append(([piece[:seq_len] for piece in chat_pieces], chat_rows))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def batch(self, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of step `step`, right-padded."""
        chosen = [pieces[(step * rows + i) % len(pieces)] for pieces, rows in self.sources for i in range(rows)]
        width = max(map(len, chosen))
        ids = torch.full((len(chosen), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, piece in enumerate(chosen):
            ids[row, :len(piece)] = torch.tensor(piece)
            mask[row, :len(piece)] = 1
        return ids.to(device), mask.to(device)

    def __call__(self, model: nn.Module, step: int, device: torch.device) -> torch.Tensor:
        return self.weight * kl_to_base(model, *self.batch(step, device))


# ---- the guard ---------------------------------------------------------------------------------------
@dataclass
class ProbePoint:
    """One probe point of a run: forgetting (percent rise of the probe perplexity) and the task loss."""

    step: int
    forgetting_pct: float
    task_loss: float


class ForgettingGuard:
    """Keeps the adapter state with the best held-out task loss among probe points whose forgetting stays
    within `max_forgetting_pct`; `restore` puts it back at the end of a run.

    Args:
        max_forgetting_pct: the budget, in percent of the base's probe perplexity.
        baseline_perplexity: the probe perplexity before training.
    """

    def __init__(self, max_forgetting_pct: float, baseline_perplexity: float) -> None:
        if not max_forgetting_pct > 0 or not math.isfinite(max_forgetting_pct):
            raise LorakitError(f"--max-forgetting must be a positive percentage, got {max_forgetting_pct}.")
        self.budget, self.baseline = max_forgetting_pct, baseline_perplexity
        self.points: list[ProbePoint] = []
        self.best: ProbePoint | None = None
        self._state: dict[str, torch.Tensor] | None = None

    def observe(self, step: int, probe_perplexity: float, task_loss: float,
                snapshot: Callable[[], dict[str, torch.Tensor]]) -> ProbePoint:
        """Record a probe point; take `snapshot()` (the trainable state) if it is the best within budget."""
        point = ProbePoint(step, 100 * (probe_perplexity - self.baseline) / self.baseline, task_loss)
        self.points.append(point)
        within = point.forgetting_pct <= self.budget and math.isfinite(task_loss)
        if within and (self.best is None or task_loss <= self.best.task_loss):
            self.best, self._state = point, snapshot()
        return point

    def restore(self, load: Callable[[dict[str, torch.Tensor]], None]) -> str:
        """Load the chosen state with `load` and say which one was kept and why (for report.md)."""
        last = self.points[-1] if self.points else None
        if self.best is None:
            return (f"no probe point stayed within {self.budget:g}% forgetting; the final adapter is kept "
                    "(lower --lr or the step count, or use --preserve).")
        if last is not None and self.best.step == last.step:
            return (f"the final adapter (step {last.step}) is kept: forgetting {last.forgetting_pct:+.1f}% is within "
                    f"{self.budget:g}% and its held-out loss {last.task_loss:.4f} is the best within budget.")
        load(self._state)
        why = (f"the final step {last.step} forgot {last.forgetting_pct:+.1f}% (over {self.budget:g}%)"
               if last.forgetting_pct > self.budget else f"step {last.step}'s held-out loss was {last.task_loss:.4f}")
        return (f"the adapter of step {self.best.step} is kept (forgetting {self.best.forgetting_pct:+.1f}%, held-out "
                f"loss {self.best.task_loss:.4f}, the best within {self.budget:g}%): {why}.")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every trainable parameter (the adapter's state), by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (from `trainable_state`) back into the model's parameters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
