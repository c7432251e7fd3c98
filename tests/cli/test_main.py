"""The command table: help, dispatch, and clear errors (the command bodies are tested beside their modules)."""
import pytest

from lorakit.cli.main import COMMANDS, main


def test_top_level_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_command_help_shows_field_docstrings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--lora-alpha" in out and "LoRA scaling numerator" in out


def test_unknown_command(capsys):
    assert main(["trian"]) == 2


def test_bad_model_spec_is_a_clear_error(capsys):
    assert main(["generate", "--model", "/no/such/model", "--prompt", "x"]) == 1
    assert "/no/such/model" in capsys.readouterr().err


def test_info_requires_adapter_dir(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 1
    assert "adapter_config.json not found" in capsys.readouterr().err
