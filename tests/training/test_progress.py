"""The progress display: plain lines every N steps off a terminal, a bar on one, nothing when disabled."""
import io

from lorakit.training.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def record(step: int, **extra) -> dict:
    return {"step": step, "epoch": step / 4, "loss": 1.0 / step, "tokens_per_s": 100.0 * step, **extra}


def test_log_lines_every_n_steps_and_at_the_end():
    stream = io.StringIO()
    progress = Progress(total_steps=7, log_every=3, stream=stream)
    for step in range(1, 8):
        progress.update(record(step, **({"eval_loss": 0.5} if step == 2 else {})))
    progress.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 3/7", "step 6/7", "step 7/7"]
    assert lines[0].startswith("step 3/7 | epoch 0.75 | loss 0.3333 | 300 tok/s | eval_loss 0.5000 | elapsed ")
    assert "eta 0:00:00" in lines[-1]


def test_default_is_about_twenty_lines():
    stream = io.StringIO()
    progress = Progress(total_steps=1000, stream=stream)
    for step in range(1, 1001):
        progress.update(record(step))
    assert len(stream.getvalue().splitlines()) == 20


def test_resumed_run_counts_eta_from_its_first_step():
    stream = io.StringIO()
    progress = Progress(total_steps=100, initial_step=90, log_every=5, stream=stream)
    progress.update(record(95))
    assert stream.getvalue().startswith("step 95/100 ")


def test_terminal_gets_a_bar_with_the_fields():
    stream = Terminal()
    progress = Progress(total_steps=2, stream=stream)
    progress.update(record(1, eval_loss=0.25))
    progress.update(record(2))
    progress.close()
    shown = stream.getvalue()
    assert "2/2" in shown and "eval_loss=0.2500" in shown and "epoch=0.50" in shown and "step 2/2 |" not in shown


def test_disabled_prints_nothing():
    stream = Terminal()
    progress = Progress(total_steps=3, enabled=False, stream=stream)
    progress.update(record(1))
    progress.close()
    assert stream.getvalue() == ""
