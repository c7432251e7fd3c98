"""QLoRA-style frozen bases: the linear layers of the transformer blocks held in 4-bit NF4 or 8-bit int8.

    nf4   bitsandbytes `Linear4bit`: 4-bit NormalFloat codes in blocks of 64 weights, each block's absmax
          scale itself quantized to 8 bits (double quantization): ~0.5 byte per weight plus ~0.13 bit.
    int8  bitsandbytes `Linear8bitLt` (LLM.int8()): one int8 per weight and one fp32 scale per row,
          with fp16 outlier columns of the input above a threshold.

The embeddings and the output head keep their dtype. LoRA wraps the quantized layers like any
`nn.Linear` (bitsandbytes' layers subclass it), and its factors train in fp32 on top. The same code
runs on CUDA and on the CPU (bitsandbytes 0.50 quantizes and multiplies NF4 and int8 on the CPU).
"""
from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn

from lorakit.core.errors import LorakitError
from lorakit.core.layers import LoraLayer, is_quantized
from lorakit.core.matching import layer_index

QUANTIZE_CHOICES = ("none", "nf4", "int8")
NF4_BLOCK = 64  # weights per NF4 block (one absmax scale each): bitsandbytes' default, as in QLoRA

# LLM.int8()'s outlier threshold, as transformers' BitsAndBytesConfig(llm_int8_threshold=6.0): input
# columns holding a value above it are multiplied in fp16 rather than int8.
INT8_THRESHOLD = 6.0

# bitsandbytes logs these on every import / forward; neither is actionable here: the first asks for an
# optional kernel fetched from the Hugging Face Hub (lorakit never downloads), the second announces
# LLM.int8()'s own design (int8 layers quantize their input from fp16).
_NOISE = ("Failed to load CPU gemm_4bit_forward", "MatMul8bitLt: inputs will be cast")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOISE)


def _bitsandbytes():
    """bitsandbytes, imported on first use (it takes seconds), with its noise filtered out."""
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    try:
        import bitsandbytes
    except ImportError:
        raise LorakitError("--quantize needs bitsandbytes: `pip install 'bitsandbytes>=0.50'`.") from None
    return bitsandbytes


def check_mode(mode: str) -> None:
    """Raise LorakitError unless `mode` is one of QUANTIZE_CHOICES."""
    if mode not in QUANTIZE_CHOICES:
        raise LorakitError(f"quantize={mode!r} is invalid: use one of {', '.join(QUANTIZE_CHOICES)}.")


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of the plain `nn.Linear` layers inside the model's transformer blocks.

    Blocks are recognized by their index in the name ("model.layers.3.mlp.up_proj"); the embeddings,
    the output head and any head outside the blocks (a classifier) are left out.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(name, module) for name, module in model.named_modules()
            if type(module) is nn.Linear and module is not head and layer_index(name, None) is not None]


def quantize_model(model: nn.Module, mode: str, compute_dtype: torch.dtype | None = None,
                   quant_storage: torch.dtype = torch.uint8) -> nn.Module:
    """Replace the frozen linear layers of the transformer blocks by bitsandbytes 4-bit or 8-bit layers, in place.

    Quantize the base before adding adapters: LoRA then wraps the quantized layers, and its factors
    train in fp32 (`layers._lora_dtype`) over them.

    Args:
        model: a transformers model (or any module whose blocks are named "<layers|h|block...>.<i>").
        mode: "nf4" (4-bit NormalFloat, double-quantized scales), "int8" (LLM.int8()), or "none".
        compute_dtype: dtype the quantized layers compute in (bf16 / fp16 / fp32); None: each layer's
            current weight dtype. It is also the dtype `dequantize_model` gives back.
        quant_storage: the dtype NF4's packed codes are stored in: uint8 (two codes a byte), or a float
            dtype (the same bits viewed as floats) so that FSDP, which shards and gathers floating
            parameters, can shard them (FSDP-QLoRA; `--shard fsdp` passes the compute dtype).

    Returns:
        The same model object.

    Raises:
        LorakitError: an unknown mode, a model that already has LoRA layers, int8 for a model on the meta
            device, one without linear layers in numbered blocks, or NF4 on the CPU for a layer whose
            in_features is not a multiple of 64. (NF4 on the meta device gives empty layers of the
            packed shape, without scales: `fill_nf4_layer` quantizes their weights later.)
    """
    check_mode(mode)
    if mode == "none":
        return model
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise LorakitError("quantize the base model before adding adapters: call quantize_model, then "
                           "lorakit.apply or load_adapter.")
    targets = quantizable_linears(model)
    if not targets:
        raise LorakitError(f"{type(model).__name__} has no nn.Linear inside numbered transformer blocks "
                           "(e.g. model.layers.0.mlp.up_proj) to quantize; --quantize supports transformer LMs.")
    if any(m.weight.device.type == "meta" for _, m in targets) and mode != "nf4":
        raise LorakitError("cannot quantize a model on the meta device to int8; load its weights first.")
    # bitsandbytes' CPU NF4 kernel (0.50) reads the block scales per row: rows whose length is not a
    # multiple of the block size come back wrong (measured: relative error 0.2-0.8 instead of 0.09).
    # (A meta model is checked too: it is filled on the CPU or the GPU later, and real models pass anyway.)
    short = [(n, m.in_features) for n, m in targets
             if m.weight.device.type in ("cpu", "meta") and m.in_features % NF4_BLOCK]
    if mode == "nf4" and short:
        raise LorakitError(f"NF4 on the CPU needs in_features divisible by {NF4_BLOCK}; {short[0][0]} has "
                           f"{short[0][1]}. Use --quantize int8, or a CUDA device.")
    bnb = _bitsandbytes()
    names = [name for name, _ in targets]
    del targets  # no reference left: each full-precision weight is freed as soon as its layer is replaced
    for name in names:
        model.set_submodule(name, _quantized_linear(bnb, model.get_submodule(name), mode, compute_dtype,
                                                    quant_storage))
    _release_freed_memory()
    return model


def _quantized_linear(bnb, linear: nn.Linear, mode: str, compute_dtype: torch.dtype | None,
                      quant_storage: torch.dtype) -> nn.Module:
    """The bitsandbytes layer holding `linear`'s weight in `mode`, and its bias in the compute dtype, frozen."""
    dtype = compute_dtype or linear.weight.dtype
    if mode == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                  quant_storage=quant_storage, device="meta")
        # On CPUs with AVX512-BF16 bitsandbytes would repack the weight at the first eval-mode forward
        # into a layout whose matmul has no backward (and which fails for d_in < 64): keep one layout,
        # so training after an evaluation gets its gradients.
        layer.support_avx512bf16_for_cpu = False
        if linear.weight.device.type == "meta":  # shape only; fill_nf4_layer quantizes the weight later
            packed = torch.empty(packed_rows(linear, quant_storage), 1, dtype=quant_storage, device="meta")
            layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                             quant_storage=quant_storage, module=layer, bnb_quantized=True)
            return _with_bias(layer, linear, dtype)
        # .to(device) quantizes: (d_out, d_in) -> packed 4-bit codes (d_out * d_in / 2 bytes, as
        # (bytes / itemsize of quant_storage, 1)) + quant_state, which it also leaves on the layer: FSDP's
        # gathered weight is a plain tensor, and bitsandbytes' forward re-attaches the state from there.
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", quant_storage=quant_storage,
                                         module=layer).to(linear.weight.device)
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
        # Int8Params quantizes when moved from the CPU to a device, hence the round trip through the CPU.
        layer.weight = bnb.nn.Int8Params(linear.weight.data.cpu(), requires_grad=False,
                                         has_fp16_weights=False).to(linear.weight.device)
        layer.compute_dtype = dtype  # Linear8bitLt has no such field; dequantize_linear reads it
    return _with_bias(layer, linear, dtype)


def _with_bias(layer: nn.Module, linear: nn.Linear, dtype: torch.dtype) -> nn.Module:
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.to(dtype), requires_grad=False)
    return layer


def packed_rows(linear: nn.Module, quant_storage: torch.dtype) -> int:
    """Rows of the (rows, 1) tensor that holds a layer's NF4 codes: two codes a byte, viewed as quant_storage."""
    return linear.in_features * linear.out_features // 2 // torch.empty(0, dtype=quant_storage).element_size()


def is_nf4_layer(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer (also once FSDP has replaced its weight by a plain sharded one)."""
    return type(module).__name__ == "Linear4bit"


def fill_nf4_layer(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Quantize `weight` (d_out, d_in) as `quantize_model` would for `layer`; set the layer's block scales and
    return the packed codes, (packed_rows, 1) in the layer's quant_storage, for the caller to place (a rank
    keeps only its rows of them under FSDP)."""
    functional = _bitsandbytes().functional
    packed, state = functional.quantize_4bit(weight, blocksize=NF4_BLOCK, compress_statistics=True, quant_type="nf4",
                                             quant_storage=layer.quant_storage)
    layer.quant_state = state  # where bitsandbytes' forward finds it when FSDP's gathered weight lacks it
    return packed


def _release_freed_memory() -> None:
    """Give the freed full-precision weights back to the OS.

    glibc keeps freed heap memory for reuse, so without this the process's resident memory on the CPU
    would not drop after quantization (measured on the default model: 986 MB -> 540 MB RSS).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the allocator decides
        pass


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The (d_out, d_in) weight a bitsandbytes NF4 or int8 layer computes with, in fp32.

    Args:
        module: a `Linear4bit` or `Linear8bitLt` made by `quantize_model` (or by transformers).

    Returns:
        A new fp32 tensor on the module's device.

    Raises:
        LorakitError: if `module` is not a quantized bitsandbytes layer.
    """
    if not is_quantized(module):
        raise LorakitError(f"{type(module).__name__} is not a bitsandbytes 4-bit/8-bit layer; nothing to dequantize.")
    functional = _bitsandbytes().functional
    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        return functional.dequantize_4bit(weight.data, weight.quant_state).float()
    # Linear8bitLt's first forward moves the row scales (SCB) from the weight into module.state.
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    return functional.int8_vectorwise_dequant(weight.data, scales).float()  # int8 (d_out, d_in) * scale / 127


def dequantize_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain `nn.Linear` holding `module`'s dequantized weight and its bias, frozen.

    Args:
        module: a quantized bitsandbytes linear layer.
        dtype: dtype of the new weight; None: the layer's compute dtype (fp32 if it has none).

    Returns:
        The new layer (on the module's device).

    Raises:
        LorakitError: if `module` is not a quantized bitsandbytes layer.
    """
    weight = dequantized_weight(module)
    dtype = dtype or getattr(module, "compute_dtype", None) or torch.float32
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
    return linear


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized bitsandbytes linear layer (LoRA base layers included) by `dequantize_linear`'s.

    Args:
        model: any module; one without quantized layers is returned unchanged.
        dtype: as in `dequantize_linear`.

    Returns:
        The same model object.
    """
    for name, module in list(model.named_modules()):
        if is_quantized(module) and isinstance(module, nn.Linear):
            model.set_submodule(name, dequantize_linear(module, dtype))
    return model


def tensor_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters, buffers and quantization statistics (each storage once).

    This is the model's own resident memory: 4-bit codes count half a byte per weight, and the NF4
    block scales (and their second-level scales) and int8 row scales are included.
    """
    tensors: list[torch.Tensor] = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:  # NF4: absmax (uint8 when double-quantized), its own absmax and code book
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code, state.offset]
        scales = getattr(weight, "SCB", None)
        if scales is None and hasattr(module, "state"):
            scales = getattr(module.state, "SCB", None)
        if isinstance(scales, torch.Tensor):
            tensors.append(scales)
    seen: dict[tuple[int, str], int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), str(t.device))] = storage.nbytes()
    return sum(seen.values())
