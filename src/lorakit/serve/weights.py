"""How the engine holds its frozen weights for decoding, and the product x @ W^T in each layout.

A decoding step is a few tokens times every weight: how fast it runs is how fast the CPU's matrix-vector
(or skinny matrix) kernel streams the weights, and which kernel streams fastest depends on the CPU and the
dtype. So the layout is a per-machine choice (`choose_layout`, measured once, cached by
`lorakit.core.autotune`):

    transposed  (d_in, d_out), contiguous; `x @ W` runs as a GEMM on every core (fp32 on Zen 2: 1.5x F.linear)
    rows        (d_out, d_in), as nn.Linear holds it; F.linear
    packed      oneDNN's blocked layout for its linear kernel (the one torch.compile's CPU freezing uses);
                bf16 on Zen 4: the batch-16 step's products in half F.linear's time. The model's modules
                keep their own weights, so this layout holds a second copy of the weights.
    gemv        packed, and the rows too (the modules keep views of them): a single row (batch-1 decoding)
                runs lorakit's compiled bf16 matrix-vector product (AVX-512 BF16; lorakit.serve.lora_kernel),
                which streams the weights faster than oneDNN at batch 1; more rows run packed. bf16 only.
    tiles       a tiled copy (for every 16 output columns and every pair of inputs, the 16 columns' two weights
                side by side), and the rows too: every product runs lorakit's compiled tiled kernel (AVX-512 BF16;
                csrc/tiles.cpp), one 64-byte load of weights feeding 16 columns of every row; on Zen 4 faster
                than gemv's kernel at one row and than oneDNN packed up to 64 rows, as fast beyond (README,
                Serving). bf16 only; no more memory than packed.

Every layout gives the same products up to the kernels' summation order (tested).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from lorakit.serve.lora_kernel import gemv_kernel, tiles_kernel

LAYOUTS = ("transposed", "rows", "packed", "gemv", "tiles")
ROW_LAYOUTS = ("tiles", "gemv", "rows")  # the layouts that keep each weight's (d_out, d_in) rows, contiguous


def packing_available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this torch has oneDNN's packed linear for `dtype` on `device` (CPU builds with oneDNN)."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and _packs(dtype)


def usable_layouts(dtype: torch.dtype, device: torch.device) -> list[str]:
    """The layouts this machine can hold weights of `dtype` in (packed and gemv need oneDNN; gemv and tiles bf16
    and the compiled kernels, which this checks by building them: once per machine)."""
    packs, compiled = packing_available(dtype, device), device.type == "cpu" and _has_compiled_kernels(dtype)
    needs = {"packed": packs, "gemv": packs and compiled, "tiles": compiled}
    return [name for name in LAYOUTS if needs.get(name, True)]


def _has_compiled_kernels(dtype: torch.dtype) -> bool:  # gemv's and tiles' (one build: both or neither)
    return dtype == torch.bfloat16 and gemv_kernel() is not None and tiles_kernel() is not None


@functools.cache
def _packs(dtype: torch.dtype) -> bool:
    # a private op of torch's CPU build (torch.compile's freezing uses it): try it once rather than trust it
    try:
        weight = torch.eye(8, dtype=dtype)
        x = torch.arange(16, dtype=dtype).view(2, 8)
        return torch.equal(_packed_linear(x, hold(weight, "packed")), x)
    except (AttributeError, RuntimeError):
        return False


def hold(rows: torch.Tensor, layout: str) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A (d_out, d_in) weight held in `layout`: what `product` multiplies by (gemv: (packed, rows); tiles:
    (tiled, rows))."""
    if layout == "gemv":
        return hold(rows, "packed"), rows.contiguous()
    if layout == "tiles":
        rows = rows.contiguous()
        return tiles_kernel()[1](rows), rows
    if layout == "transposed":
        return rows.T.contiguous()
    if layout == "packed":
        return torch.ops.mkldnn._reorder_linear_weight(rows.contiguous())
    return rows.contiguous()


def product(layout: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(x (t, d_in), held weight) -> x @ W^T (t, d_out), a fresh contiguous tensor."""
    if layout == "transposed":
        return torch.mm
    if layout == "packed":
        return _packed_linear
    if layout == "gemv":  # the kernel looked up once here, not on every product
        return functools.partial(_gemv_or_packed, gemv_kernel())
    if layout == "tiles":
        return functools.partial(_tiled, tiles_kernel()[0])
    return F.linear


def rows_of(held: torch.Tensor | tuple[torch.Tensor, torch.Tensor], layout: str) -> torch.Tensor | None:
    """The (d_out, d_in) rows a weight held in `layout` keeps (None: transposed and packed keep none)."""
    return held[1] if layout in ("gemv", "tiles") else held if layout == "rows" else None


def copy_of(held: torch.Tensor | tuple[torch.Tensor, torch.Tensor], layout: str) -> torch.Tensor | None:
    """The copy beside the rows that the gemv (oneDNN's packed) and tiles (the tiled copy) layouts hold."""
    return held[0] if layout in ("gemv", "tiles") else None


def _packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _gemv_or_packed(gemv: Callable, x: torch.Tensor, held: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    packed, rows = held  # bf16: the runner holds gemv only where usable_layouts offers it
    if x.shape[0] != 1:
        return _packed_linear(x, packed)
    out = x.new_empty(1, rows.shape[0])
    gemv(x.contiguous(), rows, out)
    return out


def _tiled(kernel: Callable, x: torch.Tensor, held: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    tiled, rows = held
    out = x.new_empty(x.shape[0], rows.shape[0])
    kernel(x.contiguous(), tiled, out)
    return out


def choose_layout(shapes: list[tuple[int, int]], dtype: torch.dtype, device: torch.device, rows: int) -> str:
    """The fastest layout on this machine for decoding through weights of these (d_out, d_in) `shapes`
    (one layer's fused projections and the head) at batch 1 and at `rows` rows, measured once per machine.

    Off the CPU: "transposed" (unmeasured: no GPU has been measured).
    """
    from lorakit.core.autotune import choose

    if device.type != "cpu":
        return "transposed"
    layouts = usable_layouts(dtype, device)
    head, layer = shapes[-1], shapes[:-1]
    copies = 8  # layers of distinct weights, so the measured weights do not sit in the CPU's caches

    @functools.cache
    def weights(layout: str) -> list[torch.Tensor]:  # built only when this machine measures
        g = torch.Generator().manual_seed(0)
        return [hold(torch.randn(shape, generator=g).to(dtype), layout) for shape in layer * copies + [head]]

    @functools.cache
    def inputs(batch: int) -> dict[int, torch.Tensor]:
        return {d_in: torch.randn(batch, d_in).to(dtype) for _, d_in in shapes}

    def run(layout: str) -> Callable[[], None]:
        multiply, dims = product(layout), [d_in for _, d_in in layer * copies + [head]]

        def step() -> None:
            for batch in (1, rows):
                xs = inputs(batch)
                for w, d_in in zip(weights(layout), dims):
                    multiply(xs[d_in], w)
        return step

    # the candidates are part of the key: a layout added to lorakit is measured, not lost to an old decision
    key = " ".join(f"{o}x{i}" for o, i in shapes) + f" b1+{rows} {str(dtype).replace('torch.', '')} {'/'.join(layouts)}"
    return choose("decode_layout", key, {name: run(name) for name in layouts}, repeats=5)
