"""LoraConfig: what to adapt and how, with Hugging Face PEFT's field names and file format."""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from lorakit.core.errors import LorakitError

INIT_CHOICES = (True, False, "gaussian", "pissa")
BIAS_CHOICES = ("none", "all", "lora_only")

# PEFT writes these fields into adapter_config.json. lorakit reads them and accepts them while they
# hold PEFT's defaults; a non-default value means a PEFT feature lorakit does not implement, so reading
# it silently would give a different model: we refuse it instead.
_PEFT_FIELDS_AT_DEFAULT: dict[str, Any] = {
    "peft_type": "LORA", "auto_mapping": None, "revision": None, "inference_mode": None,
    "peft_version": None, "megatron_config": None, "megatron_core": None, "loftq_config": {},
    "layer_replication": None, "lora_bias": False, "eva_config": None,
    "corda_config": None, "trainable_token_indices": None, "target_parameters": None,
    "use_qalora": False, "qalora_group_size": None, "alora_invocation_tokens": None,
    "arrow_config": None, "ensure_weight_tying": False, "kasa_config": None, "lora_ga_config": None,
    "monteclora_config": None, "use_bdlora": None, "velora_config": None,
}
_IGNORED_PEFT_FIELDS = {"peft_type", "auto_mapping", "revision", "inference_mode", "peft_version",
                        "megatron_core", "qalora_group_size", "ensure_weight_tying"}


@dataclass
class LoraConfig:
    """Which modules get LoRA and with what rank, scaling, dropout and initialization.

    Field names and meanings follow Hugging Face PEFT's `LoraConfig`, so a config written by either
    library reads in the other.

    Args:
        r: rank of the update B A (A is r x d_in, B is d_out x r).
        lora_alpha: scaling numerator: scaling = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA).
        lora_dropout: dropout on the LoRA branch's input only, in [0, 1).
        target_modules: modules to adapt: a list of exact names or name suffixes ("q_proj" matches
            "model.layers.0.self_attn.q_proj"), a regex string matched against the full name, or
            "all-linear" (every linear layer except the output head).
        exclude_modules: like target_modules, for names never to adapt.
        layers_to_transform: only adapt blocks with these indices (e.g. [0, 1]).
        layers_pattern: the name of the block list ("layers", "h", ...) used with layers_to_transform.
        rank_pattern: {regex on module name: rank} overriding r for the modules that match.
        alpha_pattern: {regex on module name: alpha} overriding lora_alpha likewise.
        use_rslora: rank-stabilized scaling lora_alpha / sqrt(r).
        use_dora: DoRA (weight-decomposed LoRA, linear layers only): a trainable magnitude per output row
            rescales the direction W + s B A (see lorakit.dora).
        init_lora_weights: True (A Kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r)), "pissa" (A, B
            from the top-r singular triplets of W; W keeps the residual), or False (B random too:
            the adapter changes the output from the start; for tests).
        bias: which biases train and are saved with the adapter: "none", "all", "lora_only".
        modules_to_save: modules (not LoRA-adapted) trained in full and saved with the adapter, e.g.
            a new classification head.
        fan_in_fan_out: PEFT's flag for weights stored (d_in, d_out) as in GPT-2's Conv1D. lorakit reads
            the layout from the module type itself; it writes this flag so PEFT reads the file right.
        base_model_name_or_path: the base model the adapter was trained on (recorded, not loaded).
        task_type: PEFT's task type ("CAUSAL_LM", "SEQ_CLS", ...), recorded for PEFT.

    Raises:
        LorakitError: for an invalid value, naming the field and the accepted values.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    bias: str = "none"
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        self._check_types()
        _check_rank("r", self.r)
        _check_alpha("lora_alpha", self.lora_alpha)
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise LorakitError(f"lora_dropout={self.lora_dropout!r} is invalid: use a number in [0, 1), e.g. 0.05.")
        if not isinstance(self.bias, str) or self.bias not in BIAS_CHOICES:
            raise LorakitError(f"bias={self.bias!r} is invalid: use one of {', '.join(map(repr, BIAS_CHOICES))}.")
        if not isinstance(self.init_lora_weights, (bool, str)) or self.init_lora_weights not in INIT_CHOICES:
            raise LorakitError(
                f"init_lora_weights={self.init_lora_weights!r} is invalid: use True, False, 'gaussian' or 'pissa'."
            )
        if self.use_dora and self.init_lora_weights == "pissa":
            raise LorakitError("use_dora=True with init_lora_weights='pissa' is not supported; use one of the two.")
        for key, rank in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", rank)
        for key, alpha in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{key!r}]", alpha)

    def _check_types(self) -> None:
        # A config read from JSON may hold any type anywhere: refuse it here, naming the field, rather than
        # let a list reach code that expects a mapping (AttributeError) or a bad regex reach re (re.error).
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            _check_names_or_regex(name, getattr(self, name))
        if isinstance(self.layers_pattern, str):  # as lorakit.core.matching.layer_index uses it
            _check_regex("layers_pattern", self.layers_pattern, r"(?:^|\.)(?:{})\.(\d+)(?:\.|$)")
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise LorakitError(f"{name}={value!r} is invalid: give a mapping {{regex on module name: value}}.")
            for key in value:  # as lorakit.core.matching.pattern_value uses it
                _check_regex(f"{name} key", key, r"(.*\.)?({})$")
        if self.layers_to_transform is not None and not (
                isinstance(self.layers_to_transform, list)
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers_to_transform)):
            raise LorakitError(f"layers_to_transform={self.layers_to_transform!r} is invalid: give block indices, e.g. [0, 1].")
        for name in ("use_rslora", "use_dora", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                raise LorakitError(f"{name}={getattr(self, name)!r} is invalid: use true or false.")
        for name in ("base_model_name_or_path", "task_type"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise LorakitError(f"{name}={getattr(self, name)!r} is invalid: give a string or null.")
        if self.modules_to_save is not None and not (
                isinstance(self.modules_to_save, list) and all(isinstance(m, str) for m in self.modules_to_save)):
            raise LorakitError(f"modules_to_save={self.modules_to_save!r} is invalid: give a list of module names.")

    def scaling_for(self, r: int, lora_alpha: float) -> float:
        """The factor multiplying B A: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
        return lora_alpha / math.sqrt(r) if self.use_rslora else lora_alpha / r

    def to_dict(self) -> dict[str, Any]:
        """The config as a PEFT adapter_config.json dict."""
        out = dataclasses.asdict(self)
        out.update(peft_type="LORA", inference_mode=True, revision=None)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "LoraConfig":
        """Build a config from a dict, such as a PEFT adapter_config.json.

        Raises:
            LorakitError: for an unknown field (naming the closest known ones), or a PEFT feature that
                lorakit does not implement set to a non-default value.
        """
        def check_peft_field(key: str, value: Any) -> bool:
            if key not in _PEFT_FIELDS_AT_DEFAULT:
                return False
            if key not in _IGNORED_PEFT_FIELDS and value not in (_PEFT_FIELDS_AT_DEFAULT[key], None, {}, False):
                raise LorakitError(
                    f"{source}: {key}={value!r} asks for a PEFT feature lorakit does not support; "
                    f"remove it or set it to {_PEFT_FIELDS_AT_DEFAULT[key]!r}."
                )
            if key == "peft_type" and value != "LORA":
                raise LorakitError(f"{source}: peft_type={value!r} is not a LoRA adapter; lorakit reads peft_type 'LORA'.")
            return True

        return dataclass_from_fields(cls, data, source, check_peft_field)

    def replace(self, **changes: Any) -> "LoraConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LorakitError(f"{name}={value!r} is invalid: the rank must be a positive integer, e.g. 8.")


def _check_regex(name: str, value: Any, template: str = "{}") -> None:
    """`value` is a string that compiles as a regex, alone and inside `template` (how matching uses it)."""
    if not isinstance(value, str):
        raise LorakitError(f"{name} {value!r} is invalid: give a string (a module name or a regex).")
    try:
        re.compile(value)
        re.compile(template.replace("{}", value))
    except (re.error, RecursionError, OverflowError) as e:
        raise LorakitError(f"{name} {value!r} is not a valid regular expression ({e}); escape it or fix it.") from e


def _check_names_or_regex(name: str, value: Any) -> None:
    """None, a regex string, or a list of module names (strings)."""
    if value is None:
        return
    if isinstance(value, str):
        _check_regex(name, value)
    elif not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise LorakitError(f"{name}={value!r} is invalid: give a list of module names, a regex string, or 'all-linear'.")


def _check_alpha(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise LorakitError(f"{name}={value!r} is invalid: lora_alpha must be a positive number, e.g. 16.")


# What PEFT writes into every adapter_config.json beside the method's own fields.
PEFT_METADATA = frozenset({"peft_type", "auto_mapping", "revision", "inference_mode", "peft_version"})


def config_from_dict(cls: type, data: dict[str, Any], peft_type: str, source: str,
                     unsupported: dict[str, Any] | None = None, ignored: frozenset[str] = frozenset()) -> Any:
    """A method's config dataclass (IA3Config, PrefixConfig, ...) from an adapter_config.json dict.

    Args:
        cls: the config dataclass; its fields are read, PEFT's metadata fields are skipped.
        peft_type: the value the file's peft_type must have.
        source: the file, for messages.
        unsupported: PEFT fields lorakit accepts only at the given value (a feature it does not implement).
        ignored: PEFT fields that do not change the loaded adapter (e.g. how PEFT initialized it).

    Returns:
        An instance of `cls`.

    Raises:
        LorakitError: another peft_type, an unknown field, or an unsupported feature switched on.
    """
    unsupported = unsupported or {}
    if data.get("peft_type", peft_type) != peft_type:
        raise LorakitError(f"{source}: peft_type={data['peft_type']!r}, expected {peft_type!r}.")

    def check_peft_field(key: str, value: Any) -> bool:
        if key in unsupported and value not in (unsupported[key], None):
            raise LorakitError(f"{source}: {key}={value!r} asks for a PEFT feature lorakit does not support; "
                               f"set it to {unsupported[key]!r}.")
        return key in unsupported or key in PEFT_METADATA or key in ignored

    return dataclass_from_fields(cls, data, source, check_peft_field)


def dataclass_from_fields(cls: type, data: dict[str, Any], source: str,
                          check_peft_field: Callable[[str, Any], bool]) -> Any:
    """`cls(**fields)` from the dict's keys that are `cls`'s fields; every other key goes to
    `check_peft_field(key, value)`, which raises for a value lorakit refuses and says whether it knows the key.

    Returns:
        An instance of `cls`.

    Raises:
        LorakitError: a key that is neither a field nor known to `check_peft_field` (naming the closest
            fields), or whatever `check_peft_field` or `cls` raise.
    """
    own = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in own:
            kwargs[key] = value
        elif not check_peft_field(key, value):
            close = difflib.get_close_matches(key, sorted(own), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else f" Known fields: {', '.join(sorted(own))}."
            raise LorakitError(f"{source}: unknown {cls.__name__} field {key!r}.{hint}")
    return cls(**kwargs)


def config_for_ranks(base: LoraConfig, ranks: dict[str, int], same_targets: bool = True) -> LoraConfig:
    """`base` re-ranked: r is the most common rank, every other module gets an exact rank_pattern entry.

    alpha_pattern is dropped: writers fold each module's scaling into its B (see `file_scaling`), so
    one lora_alpha serves every module.

    Args:
        base: the config the factors were trained with.
        ranks: {module path: rank} of every module the adapter will hold.
        same_targets: True when `ranks` covers exactly the modules `base` targets; False lists the
            modules by their full paths instead (e.g. when some were pruned away).

    Returns:
        The config to write.
    """
    r = Counter(ranks.values()).most_common(1)[0][0]
    changes: dict = dict(r=r, rank_pattern={re.escape(n): k for n, k in ranks.items() if k != r}, alpha_pattern={})
    if not same_targets:
        changes.update(target_modules=sorted(ranks), exclude_modules=None, layers_to_transform=None, layers_pattern=None)
    return base.replace(**changes)


def file_scaling(config: LoraConfig, rank: int) -> float:
    """The scaling PEFT and lorakit give a module of `rank` under a config written by `config_for_ranks`."""
    return config.scaling_for(rank, config.lora_alpha)
