"""lorakit.tools.generate: `lorakit generate` and `lorakit chat` on a tiny model."""
import builtins

from lorakit.tools.generate import GenerateConfig, run_chat, run_generate


def test_generate_is_greedy_and_printed(tiny_model_dir, capsys):
    cfg = GenerateConfig(model=str(tiny_model_dir), prompt="Hello", max_new_tokens=3)
    first = run_generate(cfg)
    assert capsys.readouterr().out == first + "\n"
    assert run_generate(cfg) == first  # temperature 0: greedy, the same reply again


def test_chat_until_empty_line(tiny_model_dir, capsys, monkeypatch):
    answers = iter(["Hi there", "And again", ""])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(answers))
    run_chat(GenerateConfig(model=str(tiny_model_dir), max_new_tokens=3))
    assert capsys.readouterr().out.count("model>") == 2
