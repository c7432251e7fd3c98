"""`lorakit plan`: parameters, adapter size and training memory of full fine-tuning, LoRA and QLoRA, before
allocating anything.

The model is built on the meta device from its transformers config (tensors with shapes and no
storage: a 100B-parameter config builds in seconds), and lorakit's own `apply` adds the LoRA layers
to it, so the parameter counts and the adapter's file layout are those of a real run, exactly. The
memory figures come from `memory_parts` (formulas documented there).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lorakit.core.errors import LorakitError
from lorakit.core.quantize import NF4_BLOCK
from lorakit.tools.plan_shard import GB, Units, devices_needed, shard_parts, shard_table
from lorakit.training.loss import (
    CHUNK_TOKENS as LOSS_CHUNK_TOKENS,  # the positions whose logits exist at once
)

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class PlanConfig:
    model_or_config: str | None = None
    """A transformers config.json, a model directory, a .gguf file, or 'default' (embedded SmolLM2-135M-Instruct)."""
    r: int = 8
    """LoRA rank."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules to adapt: comma-separated names (q_proj,v_proj) or all-linear."""
    batch_size: int = 1
    """Sequences per micro-batch."""
    seq_len: int = 512
    """Tokens per sequence."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Compute dtype: of the frozen base (LoRA) and of the activations."""
    device: Literal["cuda", "cpu"] = "cuda"
    """Where it trains: on cpu, lorakit's bf16 attention keeps the attention probabilities (lorakit.attention)."""
    shard: Literal["none", "fsdp"] = "none"
    """fsdp: also the per-device memory of `lorakit train --shard fsdp` over --nproc processes."""
    nproc: int = 1
    """--shard fsdp: processes (devices) the model is sharded over."""
    device_gb: float = 0.0
    """--shard fsdp: memory of one device in GB (1e9 bytes): say whether the run fits it and how many devices it needs (0: do not judge)."""
    json: bool = False
    """Print a JSON object instead of tables."""

    def __post_init__(self) -> None:
        for name in ("r", "batch_size", "seq_len", "nproc"):
            if getattr(self, name) <= 0:
                raise LorakitError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}.")


@dataclass
class ModulePlan:
    """One adapted module: its LoRA factor shapes and parameter count."""

    name: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    params: int


@dataclass
class MethodPlan:
    """Counts and memory of one method (full, lora, qlora); memory parts in bytes."""

    method: str
    total_params: int
    trainable_params: int
    adapter_bytes: int
    memory: dict[str, int]


@dataclass
class Plan:
    model: str
    base_params: int
    modules: list[ModulePlan]
    methods: list[MethodPlan]
    shard: dict[str, Any] = field(default_factory=dict)   # --shard fsdp: per method, per-device parts at nproc

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- the model on the meta device --------------------------------------------------------------------
def model_config(spec: str | dict | None):
    """A transformers config from a config dict, a config.json file, a model directory, a .gguf file or 'default'.

    Raises:
        LorakitError: a missing or unreadable file, or a config without a known model_type.
    """
    from transformers import AutoConfig, PretrainedConfig

    from lorakit.training.models import model_config_dict

    if isinstance(spec, PretrainedConfig):
        return spec
    if isinstance(spec, dict):
        data = dict(spec)
    elif spec is not None and str(spec).endswith(".json"):
        path = Path(spec)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LorakitError(f"{path} not found: give a transformers config.json, a model directory or 'default'.") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise LorakitError(f"cannot read {path} as JSON ({exc}); give a transformers config.json.") from None
    else:
        data = model_config_dict(spec)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise LorakitError("the config has no 'model_type' (e.g. \"llama\"); add it so transformers knows the architecture.")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as exc:
        raise LorakitError(f"model_type {model_type!r} is unknown to transformers: {exc}") from None


def meta_model(config) -> nn.Module:
    """The causal LM of `config` on the meta device: every parameter has its shape, none has storage.

    Raises:
        LorakitError: transformers has no causal-LM class for the config's model_type.
    """
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise LorakitError(f"lorakit plan needs a causal LM config; transformers says: {exc}") from None


def _numel(tensors) -> int:
    return sum(t.numel() for t in tensors)


def safetensors_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    """The size of the file `io.save_adapter` writes for fp32 tensors of these shapes (`safetensors.torch.save`).

    Layout: an 8-byte header length, the JSON header (metadata, then tensors sorted by name, compact
    separators, padded with spaces to a multiple of 8), then the data.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(shapes):
        size = math.prod(shapes[name]) * 4
        header[name] = {"dtype": "F32", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"))
    return 8 + math.ceil(len(text) / 8) * 8 + offset


# ---- memory ------------------------------------------------------------------------------------------
def nf4_bytes(n: int) -> int:
    """Bytes of an NF4 weight of n elements with double quantization (bitsandbytes, blocks of 64).

    n/2 (4-bit codes) + n/64 (one uint8 absmax per block) + 4 per 256 blocks (their fp32 scale)
    + 1092 per layer (the 16-entry NF4 and 256-entry absmax code books, fp32, and an fp32 offset).
    """
    blocks = math.ceil(n / NF4_BLOCK)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 1092


# Inputs that several projections share: each is kept once for their LoRA branches.
_SHARED_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in", "up_proj": "mlp_in"}


@dataclass
class _Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int
    layers: int
    vocab: int


def _shape(config) -> _Shape:
    get = lambda *names, default=None: next((getattr(config, n) for n in names if getattr(config, n, None)), default)  # noqa: E731
    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head")
    if not hidden or not heads:
        raise LorakitError(f"{type(config).__name__} has no hidden_size / num_attention_heads; lorakit plan needs a decoder LM config.")
    head_dim = get("head_dim", default=hidden // heads)
    return _Shape(hidden, get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden), heads,
                  get("num_key_value_heads", default=heads) * head_dim, get("num_hidden_layers", "n_layer"),
                  get("vocab_size"))


def cpu_attention_bytes(s: _Shape, batch: int, seq: int, e: int) -> int:
    """Extra bytes per layer and token that lorakit's CPU attention keeps over SDPA, where it applies.

    It keeps q (regrouped), the scaled k and v as SDPA keeps q, k and v, plus the probabilities (e heads, and
    per token the keys its block of queries attends: `kept_probabilities`), and no log-sum-exp (4 heads). Zero
    in fp32 or above MAX_SCORES.
    """
    from lorakit.training.attention import MAX_SCORES, kept_probabilities

    if e >= 4 or batch * s.heads * seq * seq > MAX_SCORES:
        return 0
    return e * s.heads * kept_probabilities(seq) // seq - 4 * s.heads


def activation_bytes(s: _Shape, tokens: int, e: int, adapted: list[list[tuple[str, int, int]]] | None,
                     cpu_attention_extra: int = 0) -> dict[str, int]:
    """Activations kept for backward, in bytes, without and with gradient checkpointing.

    Per layer and token, for a Llama-style block (RMSNorm, attention without a stored seq x seq
    matrix as SDPA/flash keep none, gated MLP), with e bytes per element of the compute dtype:

        e (5h + 3i + 2 kv)            both norms' inputs (fp32: 2h each), q, k, v, attention output,
                                      the MLP's gate, up and act(gate) outputs
      + 4 (heads + 2)                 fp32: attention log-sum-exp per head, both norms' 1/rms
      + e * sum of distinct inputs    the inputs the LoRA branches keep: normed x (shared by q/k/v),
            of adapted linears        attention output (o), normed x (gate/up), act * up (down)
      + e * sum of r                  each adapted linear's x A

    Full fine-tuning (`adapted` None) keeps every linear's input (3h + i) and both norms' normalized
    x (2h). With gradient checkpointing each layer keeps only its input (e h per token) and one layer
    at a time is recomputed in backward. After the blocks the fused loss keeps the gradient w.r.t. the
    final hidden states (e h per token). Checked against what autograd saves on real models
    (tests/test_plan.py).

    Args:
        s: the model's sizes.
        tokens: batch x sequence length.
        e: bytes per element of the compute dtype.
        adapted: per block, (module name, d_in, r) of each adapted linear; None for full fine-tuning.
        cpu_attention_extra: `cpu_attention_bytes`, when lorakit trains on the CPU.

    Returns:
        {"no_checkpointing": bytes, "checkpointing": bytes}.
    """
    h, i, kv = s.hidden, s.intermediate, s.kv_dim
    fixed = e * (5 * h + 3 * i + 2 * kv) + 4 * (s.heads + 2) + cpu_attention_extra
    if adapted is None:
        per_layer = [fixed + e * (5 * h + i)] * s.layers
    else:
        per_layer = []
        for modules in adapted:
            inputs = {_SHARED_INPUT.get(name, name): d_in for name, d_in, _ in modules}
            per_layer.append(fixed + e * (sum(inputs.values()) + sum(r for _, _, r in modules)))
    head = e * h * tokens
    return {"no_checkpointing": tokens * sum(per_layer) + head,
            "checkpointing": s.layers * e * h * tokens + tokens * max(per_layer) + head}


def memory_parts(method: str, s: _Shape, counts: dict[str, int], adapted: list[list[tuple[str, int, int]]] | None,
                 batch: int, seq: int, e: int, device: str = "cuda") -> dict[str, int]:
    """Training memory of `method` ("full", "lora", "qlora") by part, in bytes, with AdamW.

    weights: full: fp32 master weights (as `lorakit bench`'s full: AdamW under bf16 autocast);
        lora: the base in the compute dtype + fp32 factors; qlora: the block linears in NF4
        (`nf4_bytes`), the rest in the compute dtype, fp32 factors.
    gradients: fp32, one per trainable parameter. optimizer_states: AdamW's two fp32 moments.
    activations: `activation_bytes`, without / with gradient checkpointing; full fine-tuning adds the
        compute-dtype copies of the weights that autocast keeps for backward (not kept when checkpointing).
    logits: full: the model's own loss over all positions (compute-dtype logits, their fp32 copy
        and the fp32 log-softmax kept for backward); lora/qlora: lorakit's fused loss, which holds
        the fp32 logits of at most LOSS_CHUNK_TOKENS positions and their gradient in the compute dtype.
    """
    tokens = batch * seq
    trainable = counts["trainable"]
    if method == "full":
        weights = 4 * counts["base"] + counts["buffers"]
        acts = activation_bytes(s, tokens, e, None)
        acts["no_checkpointing"] += e * (counts["linear"] + counts["head"])
        logits = tokens * s.vocab * (e + 8)
    else:
        quantized = counts["linear"] if method == "qlora" else 0
        base = e * (counts["base"] - quantized) + (counts["nf4_bytes"] if method == "qlora" else 0)
        weights = base + counts["buffers"] + 4 * trainable
        extra = cpu_attention_bytes(s, batch, seq, e) if device == "cpu" else 0
        acts = activation_bytes(s, tokens, e, adapted, extra)
        acts = {k: v + e * trainable for k, v in acts.items()}  # the factors cast to the compute dtype
        logits = min(tokens, LOSS_CHUNK_TOKENS) * s.vocab * (4 + e)
    parts = {"weights": weights, "gradients": 4 * trainable, "optimizer_states": 8 * trainable,
             "activations": acts["no_checkpointing"], "activations_checkpointed": acts["checkpointing"], "logits": logits}
    fixed = parts["weights"] + parts["gradients"] + parts["optimizer_states"] + logits
    parts["total"] = fixed + parts["activations"]
    parts["total_checkpointed"] = fixed + parts["activations_checkpointed"]
    return parts


# ---- the plan ----------------------------------------------------------------------------------------
def _adapted_by_layer(model: nn.Module, n_layers: int) -> list[list[tuple[str, int, int]]]:
    """Per block: (short name, d_in, r) of each adapted linear; adapters outside blocks are negligible here."""
    from lorakit.core.active import lora_layers
    from lorakit.core.matching import layer_index

    out: list[list[tuple[str, int, int]]] = [[] for _ in range(n_layers)]
    for name, layer in lora_layers(model):
        index = layer_index(name, None)
        if index is not None and index < n_layers and hasattr(layer, "in_features"):
            out[index].append((name.rsplit(".", 1)[-1], layer.in_features, layer.r["default"]))
    return out


def plan(
    spec: str | dict | None = None, r: int = 8, target_modules: str | list[str] = "all-linear",
    batch_size: int = 1, seq_len: int = 512, dtype: str = "bf16", device: str = "cuda",
    nproc: int = 0, device_gb: float = 0.0,
) -> Plan:
    """Counts, adapter size and training memory of full fine-tuning, LoRA and QLoRA (NF4) for a model config.

    Args:
        spec: a config dict, a config.json path, a model directory, a .gguf file, or None / 'default'.
        r: LoRA rank.
        target_modules: as LoraConfig.target_modules ("all-linear", or names).
        batch_size, seq_len: the micro-batch the activations are estimated for.
        dtype: compute dtype, "bf16", "fp16" or "fp32".
        device: "cuda" or "cpu" (lorakit's CPU attention keeps more activations at short sequences).
        nproc: > 0: also the per-device memory of LoRA and QLoRA sharded with FSDP over nproc processes
            (`lorakit.tools.plan_shard`); device_gb > 0 then judges whether that fits a device of that size.

    Returns:
        The plan; parameter counts and adapter shapes are exact, memory is estimated (`memory_parts`).

    Raises:
        LorakitError: an unreadable config, an unknown dtype, or target_modules matching nothing.
    """
    from lorakit.core.active import lora_layers
    from lorakit.core.config import LoraConfig
    from lorakit.core.inject import apply
    from lorakit.core.io import adapter_state_dict
    from lorakit.core.quantize import quantizable_linears

    if dtype not in DTYPE_BYTES:
        raise LorakitError(f"dtype={dtype!r} is invalid: use one of {', '.join(DTYPE_BYTES)}.")
    config = model_config(spec)
    model = meta_model(config)
    sizes, e = _shape(config), DTYPE_BYTES[dtype]
    linears = [m.weight.numel() for _, m in quantizable_linears(model)]
    head = model.get_output_embeddings()
    counts = {"base": _numel(model.parameters()), "buffers": sum(b.numel() * b.element_size() for b in model.buffers()),
              "linear": sum(linears), "head": head.weight.numel() if head is not None else 0,
              "nf4_bytes": sum(nf4_bytes(n) for n in linears)}
    targets = "all-linear" if target_modules in ("all-linear", ["all-linear"]) else list(target_modules)
    apply(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))  # meta: allocates nothing
    modules = [ModulePlan(name, tuple(A.shape), tuple(B.shape), A.numel() + B.numel())
               for name, layer in lora_layers(model) for A, B in [layer.factors("default")]]
    adapter_shapes = {key: tuple(t.shape) for key, t in adapter_state_dict(model, "default").items()}
    adapter = safetensors_bytes(adapter_shapes)
    adapted = _adapted_by_layer(model, sizes.layers)
    lora = {**counts, "trainable": _numel(t for key, t in model.named_parameters() if t.requires_grad)}
    if device not in ("cuda", "cpu"):
        raise LorakitError(f"device={device!r} is invalid: use cuda or cpu.")
    batch = (batch_size, seq_len, e, device)
    methods = [
        MethodPlan("full", counts["base"], counts["base"], e * counts["base"],
                   memory_parts("full", sizes, {**counts, "trainable": counts["base"]}, None, *batch)),
        MethodPlan("lora", counts["base"] + lora["trainable"], lora["trainable"], adapter,
                   memory_parts("lora", sizes, lora, adapted, *batch)),
        MethodPlan("qlora", counts["base"] + lora["trainable"], lora["trainable"], adapter,
                   memory_parts("qlora", sizes, lora, adapted, *batch)),
    ]
    name = config.model_type + " config" if isinstance(spec, dict) else str(spec or "default")
    result = Plan(name, counts["base"], modules, methods)
    if nproc > 0:
        tokens = batch_size * seq_len
        for m in methods[1:]:
            units = fsdp_units(model, m.method, e)
            per = lambda n, m=m, units=units: shard_parts(m.memory, m.trainable_params, units, n,  # noqa: E731
                                                          tokens * sizes.vocab * (e + 8))
            parts = per(nproc)
            result.shard[m.method] = {"nproc": nproc, "parts": parts,
                                      "fits": bool(device_gb) and parts["total_checkpointed"] <= device_gb * GB,
                                      "devices_needed": devices_needed(per, device_gb * GB) if device_gb else None}
    return result


def fsdp_units(model: nn.Module, method: str, e: int) -> Units:
    """Full bytes of one decoder block (its base in the compute dtype, or NF4 linears for qlora, plus its
    factors cast to the compute dtype) and of the root unit (everything outside the blocks)."""
    from lorakit.training.sharding import decoder_blocks

    blocks = decoder_blocks(model)
    block = blocks[0]
    base = [p for p in block.parameters() if not p.requires_grad]
    size = e * _numel(p for p in block.parameters())
    if method == "qlora":
        from lorakit.core.quantize import quantizable_linears

        linears = [m.weight for _, m in quantizable_linears(model) if any(m.weight is p for p in base)]
        size += sum(nf4_bytes(w.numel()) - e * w.numel() for w in linears)
    root = _numel(p for p in model.parameters() if not p.requires_grad) - len(blocks) * _numel(base)
    return Units(block=size, root=e * root)


# ---- output ------------------------------------------------------------------------------------------
def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def plan_tables(result: Plan, cfg: PlanConfig) -> str:
    """The plan as Markdown tables: adapted modules grouped by name, then methods by part."""
    import re

    groups: dict[str, list[ModulePlan]] = {}
    for m in result.modules:
        groups.setdefault(re.sub(r"\.\d+\.", ".N.", m.name), []).append(m)
    lines = [f"model: {result.model}   base parameters: {result.base_params:,}", "",
             "| adapted module | count | A | B | parameters |", "|---|---|---|---|---|"]
    for name, members in groups.items():
        shape = lambda s: "x".join(map(str, s))  # noqa: E731
        lines.append(f"| {name} | {len(members)} | {shape(members[0].shape_a)} | {shape(members[0].shape_b)} "
                     f"| {sum(m.params for m in members):,} |")
    rows = [("total parameters", "total_params", None), ("trainable parameters", "trainable_params", None),
            ("saved file (adapter / full model)", "adapter_bytes", None)]
    rows += [(label, None, key) for label, key in (
        ("weights", "weights"), ("gradients", "gradients"), ("optimizer states", "optimizer_states"),
        ("activations", "activations"), ("activations, checkpointing", "activations_checkpointed"),
        ("logits", "logits"), ("**total**", "total"), ("**total, checkpointing**", "total_checkpointed"))]
    lines += ["", f"training memory at batch {cfg.batch_size} x {cfg.seq_len} tokens, {cfg.dtype} compute on "
                  f"{cfg.device}, AdamW, LoRA r={cfg.r}:", "",
              "| | " + " | ".join(m.method for m in result.methods) + " |", "|---" * (len(result.methods) + 1) + "|"]
    for label, attr, key in rows:
        if attr in ("total_params", "trainable_params"):
            cells = [f"{getattr(m, attr):,}" for m in result.methods]
        else:
            cells = [_human(getattr(m, attr) if attr else m.memory[key]) for m in result.methods]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_plan(cfg: PlanConfig) -> dict:
    """`lorakit plan`: print the plan as tables (or JSON); returns it as a dict."""
    if cfg.shard == "none" and (cfg.nproc != 1 or cfg.device_gb):
        raise LorakitError("--nproc and --device-gb size a sharded run: add --shard fsdp.")
    result = plan(cfg.model_or_config, cfg.r, cfg.target_modules, cfg.batch_size, cfg.seq_len, cfg.dtype, cfg.device,
                  nproc=cfg.nproc if cfg.shard == "fsdp" else 0, device_gb=cfg.device_gb)
    out = result.to_dict()
    if cfg.json:
        out["methods"] = {m["method"]: {k: v for k, v in m.items() if k != "method"} for m in out["methods"]}
        print(json.dumps(out, indent=2))
    else:
        print(plan_tables(result, cfg))
        if result.shard:
            print("\n" + shard_table(result.shard, cfg.nproc, cfg.device_gb, _human))
    return out
