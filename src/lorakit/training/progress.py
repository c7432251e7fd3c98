"""The training progress display, fit for long runs.

On a terminal: one live tqdm bar (step, epoch, loss, tokens/s, the last held-out loss, ETA). Anywhere else (a
log file, CI, `nohup`): one plain line every N steps and at the end, so a log of a week-long run stays
readable:

    step 40/120 | epoch 0.33 | loss 1.2345 | 812 tok/s | eval_loss 1.1000 | elapsed 0:01:02 | eta 0:03:05

`--quiet`: no progress at all.
"""
from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import IO, Any

LINES_PER_RUN = 20  # --log-every 0: about this many lines over a whole run


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    return str(timedelta(seconds=round(seconds)))


class Progress:
    """Shows the loop's per-step records (the metrics.jsonl dicts: step, loss, tokens_per_s, epoch, eval_loss).

    Args:
        total_steps: the run's optimizer steps.
        initial_step: the step a resumed run starts from.
        enabled: False on every process but the first, and with --quiet.
        log_every: steps between lines when the stream is not a terminal; 0: about 20 lines a run.
        stream: where to write (stderr, like tqdm); a terminal gets the bar.
    """

    def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True, log_every: int = 0,
                 stream: IO[str] | None = None) -> None:
        self.total, self.enabled = total_steps, enabled
        self.stream = stream or sys.stderr
        self.every = log_every or max(1, total_steps // LINES_PER_RUN)
        self.started, self.first_step = time.perf_counter(), initial_step
        self.eval_loss: float | None = None
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True,
                            file=self.stream)

    def fields(self, record: dict[str, Any]) -> dict[str, str]:
        """The shown values of a record: epoch, loss, tok/s and the last held-out loss."""
        self.eval_loss = record.get("eval_loss", self.eval_loss)
        shown = {"epoch": f"{record['epoch']:.2f}"} if "epoch" in record else {}
        shown.update({"loss": f"{record['loss']:.4f}", "tok/s": f"{record['tokens_per_s']:.0f}"})
        if self.eval_loss is not None:
            shown["eval_loss"] = f"{self.eval_loss:.4f}"
        return shown

    def update(self, record: dict[str, Any]) -> None:
        """Show one finished step."""
        if not self.enabled:
            return
        shown = self.fields(record)
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
            return
        step = record["step"]
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.started
        left = elapsed / max(step - self.first_step, 1) * (self.total - step)
        parts = [f"step {step}/{self.total}"] + [
            f"{name} {value}" if name != "tok/s" else f"{value} tok/s" for name, value in shown.items()]
        parts += [f"elapsed {clock(elapsed)}", f"eta {clock(left)}"]
        print(" | ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        """Close the bar (lines need no closing)."""
        if self.bar is not None:
            self.bar.close()
