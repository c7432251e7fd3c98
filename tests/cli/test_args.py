"""lorakit.cli.args: a config dataclass as a command-line parser (tyro) and a YAML config file."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from lorakit.cli.args import parse_config
from lorakit.core.errors import LorakitError
from lorakit.training.config_file import (
    config_to_yaml,
    field_help,
    load_config,
    save_config,
)


@dataclass
class Base:
    seed: int = 0
    """Random seed (100% reproducible)."""


@dataclass
class TrainConfig(Base):
    model: str | None = None
    """Model: 'default' (embedded SmolLM2-135M-Instruct), a .gguf file, or a Hugging Face model directory."""
    r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """Scaling numerator."""
    target_modules: list[str] | None = None
    """Comma-separated module names, or all-linear."""
    layers: list[int] = field(default_factory=list)
    """Block indices to adapt."""
    quantize: Literal["none", "nf4", "int8"] = "none"
    """Quantize the frozen base."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward
    to save memory."""
    use_cache: bool = True
    """Keep the KV cache."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides."""
    out: Path = Path("out")
    """Output directory."""
    bits: Optional[Literal[4, 8]] = None
    """Bits per weight."""
    note: str = field(default="", metadata={"help": "Free-form note from metadata."})

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise LorakitError(f"r={self.r} is invalid: the rank must be a positive integer.")


@dataclass
class InfoConfig:
    adapter_dir: str
    """Adapter directory to describe."""
    verbose: bool = False
    """Print every tensor."""


def parse(argv: list[str]) -> TrainConfig:
    return parse_config(TrainConfig, argv, prog="lorakit train")


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_when_nothing_given():
    assert parse([]) == TrainConfig()


def test_scalar_flags_use_dashes_and_convert():
    cfg = parse(["--r", "4", "--lora-alpha", "32", "--model", "m.gguf", "--out", "o", "--seed", "3"])
    assert (cfg.r, cfg.lora_alpha, cfg.model, cfg.out, cfg.seed) == (4, 32.0, "m.gguf", Path("o"), 3)
    assert isinstance(cfg.lora_alpha, float)


def test_bool_flag_and_no_flag():
    assert parse(["--gradient-checkpointing"]).gradient_checkpointing is True
    assert parse(["--no-use-cache"]).use_cache is False
    assert parse(["--gradient-checkpointing", "--no-gradient-checkpointing"]).gradient_checkpointing is False


def test_lists_from_comma_separated_text():
    cfg = parse(["--target-modules", "q_proj, v_proj", "--layers", "1,2,4"])
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.layers == [1, 2, 4]
    assert parse(["--target-modules", "all-linear"]).target_modules == ["all-linear"]


def test_bad_list_element_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parse(["--layers", "1,two"])
    assert "--layers" in capsys.readouterr().err


def test_dict_from_json():
    assert parse(["--rank-pattern", '{"q_proj": 16}']).rank_pattern == {"q_proj": 16}
    with pytest.raises(SystemExit):
        parse(["--rank-pattern", "q_proj=16"])


def test_literal_choices(capsys):
    assert parse(["--quantize", "nf4"]).quantize == "nf4"
    assert parse(["--bits", "4"]).bits == 4
    with pytest.raises(SystemExit):
        parse(["--quantize", "fp8"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--bits", "3"])


def test_wrong_flag_type_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        parse(["--r", "eight"])
    err = capsys.readouterr().err
    assert "--r" in err and "an integer" in err and "'eight'" in err


def test_abbreviated_flags_are_refused():
    with pytest.raises(SystemExit):
        parse(["--lora", "3"])


def test_help_shows_docstrings_and_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["--help"])
    assert exc.value.code == 0
    # Undo the help's line wrapping, and the side borders of tyro's boxes where stdout is UTF-8.
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    for text in field_help(TrainConfig).values():
        assert " ".join(text.split()) in out
    assert "--gradient-checkpointing, --no-gradient-checkpointing" in out
    assert "(default: 8)" in out and "(default: none)" in out and "(default: null)" in out
    assert "{none,nf4,int8}" in out and "--config FILE.yaml" in out and "(default: \"\")" in out


def test_field_help_sources():
    helps = field_help(TrainConfig)
    assert list(helps) == [
        "seed", "model", "r", "lora_alpha", "target_modules", "layers", "quantize",
        "gradient_checkpointing", "use_cache", "rank_pattern", "out", "bits", "note",
    ]
    assert helps["seed"] == "Random seed (100% reproducible)."  # inherited from the base dataclass
    assert helps["gradient_checkpointing"] == "Recompute activations in backward\nto save memory."
    assert helps["note"] == "Free-form note from metadata."


def test_subclass_docstring_overrides_base():
    @dataclass
    class Child(Base):
        seed: int = 1
        """Seed of the child."""

    assert field_help(Child) == {"seed": "Seed of the child."}


def test_yaml_beats_default_and_flag_beats_yaml(tmp_path):
    path = write(tmp_path, "r: 4\nlora_alpha: 1e-4\nquantize: nf4\ntarget_modules: [q_proj, v_proj]\n")
    cfg = parse(["--config", path, "--r", "16"])
    assert cfg.r == 16  # flag over YAML
    assert cfg.lora_alpha == 1e-4  # YAML 1.1 reads 1e-4 as text; it is converted
    assert cfg.quantize == "nf4" and cfg.target_modules == ["q_proj", "v_proj"]
    # A bool flag left out must not reset a YAML value to the dataclass default.
    path = write(tmp_path, "use_cache: false\ngradient_checkpointing: true\n", "b.yaml")
    cfg = parse(["--config", path])
    assert cfg.use_cache is False and cfg.gradient_checkpointing is True
    assert parse(["--config", path, "--use-cache"]).use_cache is True


def test_yaml_safe_coercions(tmp_path):
    path = write(tmp_path, "r: 8.0\nlora_alpha: 16\nlayers: 3\nmodel: null\nrank_pattern: {q_proj: 4}\n")
    cfg = parse(["--config", path])
    assert (cfg.r, cfg.lora_alpha, cfg.layers, cfg.model, cfg.rank_pattern) == (8, 16.0, [3], None, {"q_proj": 4})
    assert isinstance(cfg.lora_alpha, float) and isinstance(cfg.r, int)


def test_unknown_yaml_key_suggests_the_closest(tmp_path):
    path = write(tmp_path, "lroa_alpha: 8\n")
    with pytest.raises(LorakitError, match=r"unknown key 'lroa_alpha'.*Did you mean 'lora_alpha'") as exc:
        parse(["--config", path])
    assert path in str(exc.value)
    with pytest.raises(LorakitError, match="Valid keys: seed, model, r"):
        parse(["--config", write(tmp_path, "zzzzzz: 1\n", "z.yaml")])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("r: eight\n", "an integer"),
        ("r: 8.5\n", "an integer"),
        ("r: true\n", "an integer"),
        ("lora_alpha: high\n", "a number"),
        ("gradient_checkpointing: maybe\n", "true or false"),
        ("quantize: fp8\n", "one of 'none', 'nf4', 'int8'"),
        ("model: 7\n", "a string or null"),
        ("r: null\n", "an integer"),
        ("layers: [1, x]\n", "a list of items that are each an integer"),
        ("rank_pattern: [1]\n", "a mapping"),
    ],
)
def test_wrong_yaml_type_names_key_type_and_value(tmp_path, text, expected):
    path = write(tmp_path, text)
    key = text.split(":")[0]
    with pytest.raises(LorakitError) as exc:
        parse(["--config", path])
    message = str(exc.value)
    assert f"'{key}' must be {expected}" in message and path in message


def test_malformed_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "r: [8\n", "broken.yaml")
    with pytest.raises(LorakitError, match="broken.yaml is not valid YAML"):
        parse(["--config", path])
    with pytest.raises(LorakitError, match="must hold a mapping"):
        parse(["--config", write(tmp_path, "- r\n", "list.yaml")])
    with pytest.raises(LorakitError, match="not found"):
        parse(["--config", str(tmp_path / "missing.yaml")])


def test_empty_yaml_means_defaults(tmp_path):
    assert parse(["--config", write(tmp_path, "# nothing\n")]) == TrainConfig()


def test_post_init_errors_propagate():
    with pytest.raises(LorakitError, match="rank must be a positive"):
        parse(["--r", "0"])


def test_positional_argument(tmp_path, capsys):
    cfg = parse_config(InfoConfig, ["adapters/a", "--verbose"], prog="lorakit info", positional=("adapter_dir",))
    assert cfg == InfoConfig(adapter_dir="adapters/a", verbose=True)
    # A required positional may come from the YAML file instead.
    path = write(tmp_path, "adapter_dir: from_yaml\n")
    cfg = parse_config(InfoConfig, ["--config", path], prog="lorakit info", positional=("adapter_dir",))
    assert cfg.adapter_dir == "from_yaml"
    with pytest.raises(SystemExit):
        parse_config(InfoConfig, [], prog="lorakit info", positional=("adapter_dir",))
    err = capsys.readouterr().err  # tyro's wording: "Required options ... Missing from lorakit info: ADAPTER_DIR"
    assert "Missing from lorakit info" in err and "ADAPTER_DIR" in err


def test_optional_positional_left_out_keeps_default():
    @dataclass
    class Cfg:
        mode: Literal["a", "b"] = "a"
        """Mode."""

    assert parse_config(Cfg, [], prog="x", positional=("mode",)).mode == "a"
    assert parse_config(Cfg, ["b"], prog="x", positional=("mode",)).mode == "b"


def test_save_and_load_round_trip(tmp_path):
    cfg = TrainConfig(
        model="a: tricky 'name'", r=4, lora_alpha=1e-10, target_modules=["q_proj"], layers=[0, 2],
        quantize="int8", gradient_checkpointing=True, use_cache=False, rank_pattern={"v.*": 2},
        out=Path("runs/1"), bits=8, note="yes", seed=7,
    )
    path = tmp_path / "sub" / "saved.yaml"
    save_config(cfg, path)
    text = path.read_text()
    assert "# LoRA rank.\nr: 4\n" in text
    assert parse(["--config", str(path)]) == cfg
    assert load_config(TrainConfig, path) == cfg
    assert parse(["--config", str(path), "--r", "2"]).r == 2
    save_config(TrainConfig(), path)
    assert load_config(TrainConfig, path) == TrainConfig()


def test_load_config_requires_required_fields(tmp_path):
    with pytest.raises(LorakitError, match="missing required key"):
        load_config(InfoConfig, write(tmp_path, "verbose: true\n"))


def test_programming_errors_are_type_errors():
    @dataclass
    class Clash:
        config: str = ""

    @dataclass
    class Unsupported:
        pair: tuple[int, int] = (1, 2)

    with pytest.raises(TypeError, match="--config"):
        parse_config(Clash, [], prog="x")
    with pytest.raises(TypeError, match="unsupported"):
        parse_config(Unsupported, [], prog="x")
    with pytest.raises(TypeError, match="no field"):
        parse_config(InfoConfig, [], prog="x", positional=("nope",))
    with pytest.raises(TypeError):
        config_to_yaml(InfoConfig)


# ---- option groups: a field whose type is a dataclass; flags and YAML keys stay flat -----------------
@dataclass
class LoraOptions:
    """LoRA's options."""

    r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """Scaling numerator."""

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise LorakitError(f"r={self.r} is invalid: the rank must be a positive integer.")


@dataclass
class DataOptions:
    """Where the data comes from."""

    data: Optional[str] = None
    """Training data."""
    layers: list[int] = field(default_factory=list)
    """Block indices to adapt."""


@dataclass
class Composed:
    lora: LoraOptions = field(default_factory=LoraOptions)
    data_options: DataOptions = field(default_factory=lambda: DataOptions(layers=[1]))
    output: str = "runs"
    """Run directory."""
    resume: bool = False
    """Continue from the latest checkpoint."""


def parse_composed(argv: list[str]) -> Composed:
    return parse_config(Composed, argv, prog="lorakit train")


def test_group_options_are_flat_flags():
    cfg = parse_composed(["--r", "4", "--lora-alpha", "2", "--data", "d.jsonl", "--resume", "--output", "o"])
    assert cfg == Composed(LoraOptions(4, 2.0), DataOptions("d.jsonl", [1]), "o", True)
    assert parse_composed([]) == Composed()
    assert parse_composed([]).data_options.layers == [1]  # the group field's default_factory counts
    with pytest.raises(SystemExit):
        parse_composed(["--lora.r", "4"])


def test_group_help_lists_flat_flags(capsys):
    with pytest.raises(SystemExit):
        parse_composed(["--help"])
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "--r N LoRA rank. (default: 8)" in out and "--layers N,N,..." in out and "(default: 1)" in out
    assert "--lora.r" not in out and "--lora-alpha" in out


def test_group_yaml_is_flat_and_round_trips(tmp_path):
    path = write(tmp_path, "r: 4\nlayers: [2, 3]\noutput: x\n")
    cfg = parse_composed(["--config", path, "--r", "6"])
    assert cfg == Composed(LoraOptions(6, 16.0), DataOptions(None, [2, 3]), "x", False)
    assert load_config(Composed, path) == Composed(LoraOptions(4, 16.0), DataOptions(None, [2, 3]), "x", False)
    with pytest.raises(LorakitError, match="unknown key 'lora'"):
        parse_composed(["--config", write(tmp_path, "lora:\n  r: 4\n", "nested.yaml")])
    saved = tmp_path / "saved.yaml"
    save_config(cfg, saved)
    text = saved.read_text()
    assert text.startswith("# LoRA rank.\nr: 6\n") and "\nlayers:\n- 2\n- 3\n" in text and "lora:" not in text
    assert load_config(Composed, saved) == cfg
    assert parse_composed(["--config", str(saved)]) == cfg


def test_group_post_init_errors_propagate(tmp_path):
    with pytest.raises(LorakitError, match="rank must be a positive"):
        parse_composed(["--r", "0"])
    with pytest.raises(LorakitError, match="rank must be a positive"):
        load_config(Composed, write(tmp_path, "r: 0\n"))


def test_group_option_names_must_be_unique():
    @dataclass
    class Twice:
        lora: LoraOptions = field(default_factory=LoraOptions)
        r: int = 2

    with pytest.raises(TypeError, match="unique"):
        parse_config(Twice, [], prog="x")
