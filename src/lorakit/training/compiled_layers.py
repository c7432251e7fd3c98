"""Regional `torch.compile` of a model's decoder layers for the training forward and backward.

Between a decoder layer's matrix products sit RMSNorm, rotary, the SiLU gate, residual adds and casts,
each its own pass over memory; Inductor fuses them. Where that pays depends on the CPU (in bf16 on a CPU
without AMX the fused layers win clearly; in fp32 on an AVX2 CPU the step is its GEMMs and compile gains
nothing: README, Performance), so `--compile auto` measures it once per machine (`lorakit.core.autotune`).

Shape of the change: every decoder layer gets an instance `forward` that calls one compiled function of
the layer class's own forward (the layer passed as an argument) while the layer trains with gradients on,
and the class's eager forward otherwise. One graph serves all layers: dynamo treats the layer index as an
unspecialized int (`allow_unspec_int_on_nn_module`) instead of recompiling per layer. Evaluation,
generation and `--preserve`'s no-grad base pass stay eager, so their KV caches never reach dynamo. The
instance forward is a bound method, so `copy.deepcopy` rebinds it to the copy; `restore_eager` removes it.
"""
from __future__ import annotations

import types
from typing import Callable

import torch
from torch import nn

from lorakit.core.errors import LorakitError

# Below this many parameters a one-off compile (10-60 s) costs more than a run's fused steps save.
MIN_PARAMETERS = 50_000_000
# ... and a run shorter than this many optimizer steps does not repay it either.
MIN_STEPS = 20

_compiled_forwards: dict[type, Callable] = {}


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of repeated blocks: the nn.ModuleList of one class holding the most parameters
    (None: no such list). `--shard fsdp` shards these blocks one by one, `--compile` compiles them."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and len({type(b) for b in m}) == 1]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters())) if lists else None


def _compiled_forward(layer_class: type) -> Callable:
    if layer_class not in _compiled_forwards:
        import torch._dynamo.config as dynamo_config

        dynamo_config.allow_unspec_int_on_nn_module = True  # the layer index: one graph for every layer
        _compiled_forwards[layer_class] = torch.compile(layer_class.forward)
    return _compiled_forwards[layer_class]


def _training_forward(self: nn.Module, *args, **kwargs):
    if self.training and torch.is_grad_enabled():
        return _compiled_forward(type(self))(self, *args, **kwargs)
    return type(self).forward(self, *args, **kwargs)


def compile_layers(model: nn.Module) -> int:
    """Route the decoder layers' training forward through one compiled graph; returns how many layers."""
    layers = decoder_layers(model)
    if layers is None:
        raise LorakitError(f"--compile: found no stack of decoder layers in {type(model).__name__}; "
                           "use --compile off for this model.")
    for layer in layers:
        layer.forward = types.MethodType(_training_forward, layer)
    return len(layers)


def restore_eager(model: nn.Module) -> None:
    """Undo `compile_layers`: every layer's forward is its class's eager one again."""
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) is _training_forward:
            del module.forward


def _fwd_bwd(model: nn.Module, tokens: int) -> Callable[[], None]:
    """A function running the training loss forward and backward of one (1, tokens) batch."""
    from lorakit.training.loss import loss_sum

    g = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=g).to(device)
    mask = torch.ones_like(ids)

    def run() -> None:
        total, n = loss_sum(model, ids, mask, ids)
        (total / n).backward()
    return run


def adapter_kinds(layer: nn.Module) -> str:
    """The lorakit classes adapting a layer ("DoraLinear+Linear"; "plain": none): the layer's graph, and so
    whether compiling it pays, depends on them (a DoRA layer has more elementwise work to fuse)."""
    kinds = {type(m).__name__ for m in layer.modules() if type(m).__module__.startswith("lorakit.")}
    return "+".join(sorted(kinds)) or "plain"


def attention_kind(model: nn.Module) -> str:
    """The model's attention function as the compile decision's key names it (lorakit's CPU attention with its
    query block: a change to it can change whether compiling pays)."""
    from lorakit.training import attention

    name = getattr(getattr(model, "config", None), "_attn_implementation", None) or "default"
    return f"{name} q{attention.QUERY_BLOCK}" if name == attention.NAME else name


def compile_pays(model: nn.Module, tokens: int, dtype: torch.dtype) -> bool:
    """Whether the compiled layers run this model's forward and backward faster than eager on this machine:
    measured once per machine and shape on a (1, tokens) batch (`lorakit.core.autotune`), cached."""
    from lorakit.core.autotune import choose

    layers = decoder_layers(model)
    if layers is None:
        return False
    hidden = getattr(model.config, "hidden_size", 0)
    key = (f"{type(layers[0]).__name__} L{len(layers)} d{hidden} t{tokens} {str(dtype).removeprefix('torch.')} "
           f"{adapter_kinds(layers[0])} {attention_kind(model)}")
    run = _fwd_bwd(model, tokens)

    def compiled() -> None:
        compile_layers(model)
        try:
            run()
        finally:
            restore_eager(model)

    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]):  # dropout in the measured passes must not shift training's RNG
            winner = choose("layer_compile", key, {"eager": run, "compiled": compiled}, repeats=3)
    except Exception as error:  # noqa: BLE001 - no C++ compiler, an op Inductor cannot lower: stay eager
        print(f"--compile auto: compiling the decoder layers failed ({type(error).__name__}: {error}); eager.")
        winner = "eager"
    finally:
        restore_eager(model)
        model.train(was_training)
        for p in model.parameters():
            p.grad = None
    return winner == "compiled"


def should_compile(mode: str, model: nn.Module, *, device: torch.device, steps: int, tokens: int,
                   dtype: torch.dtype, single_process: bool, plain_layers: bool) -> bool:
    """--compile on|off|auto. auto: on a single-process CPU run of a model and run large enough to repay
    the compile, with plain (unquantized, uncheckpointed) layers, when measured faster on this machine."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    size = sum(p.numel() for p in model.parameters())
    if (device.type != "cpu" or not single_process or not plain_layers or size < MIN_PARAMETERS
            or steps < MIN_STEPS):
        return False
    return compile_pays(model, tokens, dtype)
