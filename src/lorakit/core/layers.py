"""LoRA layers: each wraps the module it adapts (composition) and adds named low-rank updates.

    y = base_layer(x) + sum over active adapters of  scaling * B (A (dropout(x)))

A layer holds any number of adapters by name; the frozen weight lives untouched in `base_layer`
until `merge()` folds an update into it. Every layer class answers the same questions:
the shapes of A and B, how to initialize them, the update's forward branch, the update as a dense
matrix in the base weight's own layout (`delta_weight`), and its tensors in PEFT's file layout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.errors import LorakitError


def is_transposed_linear(module: nn.Module) -> bool:
    """A linear layer whose weight is stored (d_in, d_out): transformers' GPT-2 `Conv1D`, or ours."""
    return isinstance(module, TransposedLinear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit/8-bit layer: its `weight` holds packed integers, not the (d_out, d_in) matrix."""
    return type(getattr(module, "weight", None)).__name__ in ("Params4bit", "Int8Params")


class TransposedLinear(nn.Module):
    """y = x W + b with W stored (d_in, d_out), the layout of GPT-2's Conv1D and loralib's fan_in_fan_out."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # nn.Linear's init, applied to the transposed view so both layouts start from the same law.
        nn.init.kaiming_uniform_(self.weight.T, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.T, self.bias)


# Up to this many tokens in one call (generation's decoding steps), the CPU inference path runs the LoRA
# branch in fp32 (see Linear.add_update).
_FP32_DECODE_TOKENS = 16


def _lora_dtype(weight: torch.Tensor) -> torch.dtype:
    # LoRA factors train in fp32 even over a bf16/fp16 or quantized base: their updates are tiny
    # relative to their values, and the optimizer state follows their dtype.
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class LoraLayer(nn.Module):
    """Base of all LoRA layers: the wrapped `base_layer` plus adapters stored by name.

    Subclasses define `a_name`/`b_name` (the attribute names, which are also PEFT's), the factor
    shapes, the forward branch and the dense update.
    """

    a_name = "lora_A"
    b_name = "lora_B"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        setattr(self, self.a_name, nn.ParameterDict())
        setattr(self, self.b_name, nn.ParameterDict())
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # The exact weight before the first merge, so that unmerge restores it bit for bit.
        self._unmerged_weight: torch.Tensor | None = None

    # The base layer's weight and bias, for code that reads `module.weight` (weight tying, dtype probes).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def factors(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """(A, B) of adapter `name`."""
        return getattr(self, self.a_name)[name], getattr(self, self.b_name)[name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter `name`: its factors (DoRA adds its magnitude vector)."""
        return list(self.factors(name))

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    # ---- adapters -------------------------------------------------------------------------------
    def add_adapter(
        self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
        use_rslora: bool = False, init: bool | str = True,
    ) -> None:
        """Create adapter `name` with rank r; it becomes active in this layer."""
        if name in self.r:
            raise LorakitError(f"adapter {name!r} already exists on this layer; pick another name or delete it first.")
        weight = self.base_layer.weight
        shape_a, shape_b = self.factor_shapes(r)
        dtype = _lora_dtype(weight)
        getattr(self, self.a_name)[name] = nn.Parameter(torch.empty(shape_a, dtype=dtype, device=weight.device))
        getattr(self, self.b_name)[name] = nn.Parameter(torch.empty(shape_b, dtype=dtype, device=weight.device))
        # No dropout module at p=0: nn.Identity returns its input without a copy.
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.init_factors(name, init)
        self.active_adapters.append(name)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise LorakitError(f"adapter {name!r} is merged into the weights; unmerge it before deleting it.")
        for attr in (self.a_name, self.b_name):
            del getattr(self, attr)[name]
        del self.lora_dropout[name], self.r[name], self.lora_alpha[name], self.scaling[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    @torch.no_grad()
    def init_factors(self, name: str, init: bool | str) -> None:
        """Initialize A and B so that B A = 0 (True, "gaussian") or not (False: for tests)."""
        A, B = self.factors(name)
        if init == "pissa":
            raise LorakitError(f"init_lora_weights='pissa' needs a linear layer; {type(self.base_layer).__name__} has none.")
        if init == "gaussian":
            nn.init.normal_(A, std=1 / self.r[name])
        else:
            nn.init.kaiming_uniform_(A.view(A.shape[0], -1), a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(B.view(B.shape[0], -1), a=math.sqrt(5))
        else:
            nn.init.zeros_(B)

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                result = self.add_update(result, x, name)
        return result

    def add_update(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """result + the update of adapter `name` for input x (subclasses may fuse the addition)."""
        return result + self.lora_branch(x, name).to(result.dtype)

    # ---- merging --------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: list[str] | None = None, keep_original: bool = True) -> None:
        """Fold the updates of `names` (default: the active adapters) into the base weight.

        Raises:
            LorakitError: an adapter is already merged, or the merged weight would hold NaN/Inf
                (the weight is then left as it was).
        """
        if is_quantized(self.base_layer):
            raise LorakitError(
                "cannot merge into a quantized (4-bit/8-bit) base weight: the update would be rounded away. "
                "Use lorakit.merge_and_unload(model) or `lorakit merge`, which dequantize the base first."
            )
        weight = self.base_layer.weight
        for name in names if names is not None else list(self.active_adapters):
            if name in self.merged_adapters:
                raise LorakitError(f"adapter {name!r} is already merged; call unmerge() before merging it again.")
            merged = weight.float() + self.delta_weight(name).float()
            if not torch.isfinite(merged).all():
                raise LorakitError(
                    f"merging adapter {name!r} would put NaN/Inf into the weights; the adapter is corrupt "
                    "(check its training loss) and nothing was merged."
                )
            if keep_original and self._unmerged_weight is None:
                self._unmerged_weight = weight.detach().clone()
            weight.copy_(merged.to(weight.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged update out of the base weight; restores the original weight exactly."""
        if not self.merged_adapters:
            return
        weight = self.base_layer.weight
        if self._unmerged_weight is not None:
            weight.copy_(self._unmerged_weight)
        else:
            for name in reversed(self.merged_adapters):
                weight.copy_((weight.float() - self.delta_weight(name).float()).to(weight.dtype))
        self._unmerged_weight = None
        self.merged_adapters.clear()

    # ---- what subclasses define ------------------------------------------------------------------
    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def lora_branch(self, x: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B A as a dense tensor in the base weight's shape and layout (fp32)."""
        raise NotImplementedError

    def to_peft(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name` as {PEFT key suffix: tensor}, e.g. {"lora_A.weight": A, "lora_B.weight": B}."""
        A, B = self.factors(name)
        return {f"{self.a_name}.weight": A, f"{self.b_name}.weight": B}

    def peft_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        """The shapes `to_peft` gives for rank r, to check a file before loading it."""
        shape_a, shape_b = self.factor_shapes(r)
        return {f"{self.a_name}.weight": shape_a, f"{self.b_name}.weight": shape_b}

    @torch.no_grad()
    def load_peft(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors in PEFT's layout (as `to_peft` returns them) into adapter `name`."""
        A, B = self.factors(name)
        A.copy_(tensors[f"{self.a_name}.weight"].reshape(A.shape))
        B.copy_(tensors[f"{self.b_name}.weight"].reshape(B.shape))


class Linear(LoraLayer):
    """LoRA on `nn.Linear` (W: d_out x d_in) or a transposed linear such as GPT-2's Conv1D (d_in x d_out)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_transposed_linear(base_layer)
        if is_quantized(base_layer):  # a packed 4-bit weight is (n / 2, 1): read the layer's own sizes
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            d0, d1 = base_layer.weight.shape
            self.in_features, self.out_features = (d0, d1) if self.fan_in_fan_out else (d1, d0)
        # PiSSA adapters keep their starting factors (A0, B0), so a save can express them against the
        # original W rather than the residual (see io._export_factors).
        self.pissa_initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._inference_cache: dict[str, tuple] = {}  # see _inference_factors
        # Decoding steps on the CPU run the branch in fp32 where that is faster on this machine; set per
        # layer by lorakit.training.decoding.tune_lora_decoding (fp32 until then).
        self.decode_fp32 = True

    def delete_adapter(self, name):
        super().delete_adapter(name)
        self.pissa_initial.pop(name, None)
        self._inference_cache.pop(name, None)

    def train(self, mode: bool = True):
        self._inference_cache.clear()
        return super().train(mode)

    def factor_shapes(self, r):
        return (r, self.in_features), (self.out_features, r)

    def lora_branch(self, x, name):
        A, B = self.factors(name)
        x = self.lora_dropout[name](x)
        # (..., d_in) -> (..., r) -> (..., d_out), in the activations' dtype (bf16 under bf16 compute).
        return F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype)) * self.scaling[name]

    def add_update(self, result, x, name):
        # One GEMM that also does the addition: result + h @ (s B)^T, with h = dropout(x) A^T (..., r).
        # Scaling B (d_out x r) instead of the output (tokens x d_out) saves a pass over the activations.
        if torch.is_grad_enabled() or self.training:
            A, B = self.factors(name)
            A, scaled_b = A.to(x.dtype), (B * self.scaling[name]).to(result.dtype)
        elif (self.decode_fp32 and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
              and x.numel() <= _FP32_DECODE_TOKENS * x.shape[-1]):
            # Decoding on the CPU: a few tokens, where bf16 GEMMs of this size can cost several times their
            # fp32 version (kernel set-up dominates); the factors are fp32 already.
            A, scaled_b = self._inference_factors(name, torch.float32, torch.float32)
            return result + F.linear(F.linear(x.float(), A), scaled_b).to(result.dtype)
        else:
            A, scaled_b = self._inference_factors(name, x.dtype, result.dtype)
        h = F.linear(self.lora_dropout[name](x), A)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]).to(result.dtype), scaled_b.T)
        return out.view(result.shape)

    def _inference_factors(self, name, x_dtype, out_dtype):
        # In eval mode without autograd (generation) the cast A and the scaled, cast B are kept between
        # calls: decoding runs one token at a time, where these small ops cost as much as the GEMMs. The key
        # holds the factors' storage, in-place version counters, dtype and device, so an optimizer step, a
        # load or a copy_ rebuilds them; writes through `.data` bypass the counter, hence train() clears it.
        A, B = self.factors(name)
        key = (A.data_ptr(), A._version, B.data_ptr(), B._version, A.dtype, B.dtype, A.device,
               self.scaling[name], x_dtype, out_dtype)
        cached = self._inference_cache.get(name)
        if cached is None or cached[0] != key:
            cached = (key, A.detach().to(x_dtype), (B.detach() * self.scaling[name]).to(out_dtype))
            self._inference_cache[name] = cached
        return cached[1], cached[2]

    def delta_weight(self, name):
        A, B = self.factors(name)
        delta = (B.float() @ A.float()) * self.scaling[name]  # (d_out, d_in)
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def init_factors(self, name, init):
        if init != "pissa":
            return super().init_factors(name, init)
        if is_quantized(self.base_layer):
            raise LorakitError("init_lora_weights='pissa' rewrites the base weight, which a quantized base cannot "
                               "hold exactly; use the default init with --quantize, or an unquantized base.")
        # PiSSA: the adapter starts as the top-r singular part of W and W keeps the rest, so the
        # model's output is unchanged at step 0 while training moves the principal directions.
        weight = self.base_layer.weight
        W = weight.float().T if self.fan_in_fan_out else weight.float()  # (d_out, d_in)
        r, scaling = self.r[name], self.scaling[name]
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        sqrt_s = S[:r].sqrt()
        A, B = self.factors(name)
        A.copy_((sqrt_s[:, None] * Vh[:r]) / math.sqrt(scaling))
        B.copy_((U[:, :r] * sqrt_s[None, :]) / math.sqrt(scaling))
        self.pissa_initial[name] = (A.detach().clone(), B.detach().clone())
        residual = W - scaling * (B.float() @ A.float())
        weight.copy_((residual.T if self.fan_in_fan_out else residual).to(weight.dtype))


class Embedding(LoraLayer):
    """LoRA on `nn.Embedding` (W: num_embeddings x dim); A is r x num_embeddings, B is dim x r."""

    a_name = "lora_embedding_A"
    b_name = "lora_embedding_B"

    def factor_shapes(self, r):
        num, dim = self.base_layer.weight.shape
        return (r, num), (dim, r)

    @torch.no_grad()
    def init_factors(self, name, init):
        # As PEFT and loralib: A = 0 and B ~ N(0, 1) (the rows of A are what a lookup selects).
        A, B = self.factors(name)
        if init == "pissa":
            raise LorakitError("init_lora_weights='pissa' is for linear layers; exclude embeddings from target_modules.")
        nn.init.normal_(B)
        if init is False:
            nn.init.normal_(A)
        else:
            nn.init.zeros_(A)

    def lora_branch(self, x, name):
        A, B = self.factors(name)
        base = self.base_layer
        # ids (...) -> rows of A^T (..., r) -> (..., dim)
        after_a = F.embedding(x, A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        return (after_a @ B.T) * self.scaling[name]

    def delta_weight(self, name):
        A, B = self.factors(name)
        return (B.float() @ A.float()).T * self.scaling[name]  # (num_embeddings, dim)

    def to_peft(self, name):
        A, B = self.factors(name)
        return {self.a_name: A, self.b_name: B}

    def peft_shapes(self, r):
        shape_a, shape_b = self.factor_shapes(r)
        return {self.a_name: shape_a, self.b_name: shape_b}

    @torch.no_grad()
    def load_peft(self, name, tensors):
        A, B = self.factors(name)
        A.copy_(tensors[self.a_name])
        B.copy_(tensors[self.b_name])


class Conv(LoraLayer):
    """LoRA on `nn.Conv1d`/`nn.Conv2d`/`nn.Conv3d`, PEFT's layout: A is a conv with the base kernel
    (in -> r channels), B a 1x1 conv (r -> out channels). The dense update is B A reshaped to W's shape."""

    def __init__(self, base_layer: nn.Module) -> None:
        if base_layer.groups != 1:
            raise LorakitError(
                f"LoRA on grouped convolutions (groups={base_layer.groups}) is not supported; exclude this layer."
            )
        super().__init__(base_layer)
        self._conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[base_layer.weight.dim() - 2]

    def factor_shapes(self, r):
        out_ch, in_ch, *kernel = self.base_layer.weight.shape
        return (r, in_ch, *kernel), (out_ch, r, *[1] * len(kernel))

    def lora_branch(self, x, name):
        A, B = self.factors(name)
        base = self.base_layer
        x = self.lora_dropout[name](x)
        if base.padding_mode != "zeros":
            raise LorakitError(f"padding_mode={base.padding_mode!r} is not supported with LoRA; use 'zeros'.")
        after_a = self._conv(x, A.to(x.dtype), None, base.stride, base.padding, base.dilation)
        return self._conv(after_a, B.to(x.dtype)) * self.scaling[name]

    def delta_weight(self, name):
        A, B = self.factors(name)
        delta = B.float().flatten(1) @ A.float().flatten(1)  # (out, in * prod(kernel))
        return delta.view(self.base_layer.weight.shape) * self.scaling[name]


class MergedLinear(Linear):
    """LoRA on a packed projection (GPT-2's c_attn: q, k, v side by side in the output), applied to a
    chosen subset of its equal slices, as loralib's `MergedLinear(enable_lora=[True, False, True])`.

    A is (r * k) x d_in and B is (d_out / n * k) x r for k enabled slices out of n: slice i of the
    output gets B_i A_i, the others nothing. In PEFT's format it is an exact rank r*k LoRA whose B is
    zero outside each slice's block.
    """

    def __init__(self, base_layer: nn.Module, enable_lora: list[bool]) -> None:
        super().__init__(base_layer)
        n = len(enable_lora)
        if n == 0 or self.out_features % n != 0 or not any(enable_lora):
            raise LorakitError(
                f"enable_lora={enable_lora} must mark at least one of n equal slices of out_features={self.out_features}."
            )
        self.enable_lora = [bool(e) for e in enable_lora]
        self.slice_size = self.out_features // n
        self.enabled_slices = [i for i, e in enumerate(self.enable_lora) if e]

    add_update = LoraLayer.add_update  # its branch scatters into slices: no single GEMM

    def factor_shapes(self, r):
        k = len(self.enabled_slices)
        return (r * k, self.in_features), (self.slice_size * k, r)

    def _pad(self, per_slice: torch.Tensor) -> torch.Tensor:
        # (..., k, slice) -> (..., n * slice) with zeros for the slices without LoRA.
        full = per_slice.new_zeros(*per_slice.shape[:-2], len(self.enable_lora), self.slice_size)
        full[..., self.enabled_slices, :] = per_slice
        return full.flatten(-2)

    def lora_branch(self, x, name):
        A, B = self.factors(name)
        k, r = len(self.enabled_slices), self.r[name]
        x = self.lora_dropout[name](x)
        after_a = F.linear(x, A.to(x.dtype)).unflatten(-1, (k, r))  # (..., k, r)
        after_b = torch.einsum("...kr,ksr->...ks", after_a, B.to(x.dtype).view(k, self.slice_size, r))
        return self._pad(after_b) * self.scaling[name]

    def delta_weight(self, name):
        A, B = self.factors(name)
        k, r = len(self.enabled_slices), self.r[name]
        # per enabled slice: B_i (slice, r) @ A_i (r, d_in); disabled slices stay zero.
        per_slice = torch.bmm(B.float().view(k, self.slice_size, r), A.float().view(k, r, self.in_features))
        full = per_slice.new_zeros(len(self.enable_lora), self.slice_size, self.in_features)
        full[self.enabled_slices] = per_slice
        delta = full.reshape(self.out_features, self.in_features) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def to_peft(self, name):
        A, B = self.factors(name)
        k, r = len(self.enabled_slices), self.r[name]
        dense_b = B.new_zeros(self.out_features, r * k)  # block structure: slice i <- B_i
        for e, i in enumerate(self.enabled_slices):
            dense_b[i * self.slice_size:(i + 1) * self.slice_size, e * r:(e + 1) * r] = B[e * self.slice_size:(e + 1) * self.slice_size]
        return {"lora_A.weight": A, "lora_B.weight": dense_b}

    def peft_shapes(self, r):
        raise LorakitError("a MergedLinear adapter is written in PEFT's format but read back with lorakit.apply on the base model.")


# Ordered dispatch: the first predicate that accepts a module picks its LoRA layer class.
LAYER_DISPATCH: list[tuple[callable, type[LoraLayer]]] = [
    (lambda m: isinstance(m, nn.Embedding), Embedding),
    (lambda m: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)), Conv),
    (is_transposed_linear, Linear),
    (lambda m: isinstance(m, nn.Linear), Linear),
]


def lora_class_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer class that adapts `module`, or None if lorakit cannot adapt it."""
    for accepts, cls in LAYER_DISPATCH:
        if accepts(module):
            return cls
    return None
