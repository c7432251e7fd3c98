"""DoRA (Liu et al. 2024): weight-decomposed LoRA on linear layers, in PEFT's file layout.

The adapted weight is a learned magnitude times a direction:

    W' = m * (W + s B A) / ||W + s B A||        m: (d_out,), the norm is taken over each output row

so the layer computes, with g = m / ||W + s B A|| (d_out,),

    y = base(x) + (g - 1) * (W x) + g * s B A x  =  g * (W x + s B A x) + b      (one adapter)

which costs LoRA's step plus one product by g (and its backward). The norm is treated as a constant (no
gradient flows through it; the paper's section 4.3 and PEFT do the same), which is what makes it
cacheable. It comes from (d_out, r) and (r, r) products, never from a materialized d_out x d_in matrix
(PEFT materializes B A and W + s B A every forward). In eval mode it is computed once per change of A,
B or W and reused (generation: every token); in training once per forward, since fused optimizers update
A and B in place without a trace to key a cache on.
File key: `<module>.lora_magnitude_vector` (PEFT's), the magnitude m.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.errors import LorakitError
from lorakit.core.layers import Linear, LoraLayer


class DoraLinear(Linear):
    """A LoRA `Linear` whose adapters are all DoRA adapters (each has a magnitude vector).

    Raises:
        LorakitError: the base weight is not a dense floating-point matrix (e.g. 4-bit quantized).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        if not base_layer.weight.is_floating_point():
            raise LorakitError(
                f"DoRA needs the dense base weight for its norm; {type(base_layer).__name__} stores it quantized. "
                "Use plain LoRA on a quantized base, or load the base unquantized."
            )
        super().__init__(base_layer)
        self.lora_magnitude_vector = nn.ParameterDict()
        # Eval-mode norms by adapter: (fingerprint of A, B, W, scaling) -> ||W + s B A|| (d_out,) fp32.
        self._norm_cache: dict[str, tuple[tuple, torch.Tensor]] = {}
        # ||W_i||^2 (d_out,) fp32: W is frozen, so this lives until W changes (merge, dtype/device move).
        self._weight_sq: tuple[tuple, torch.Tensor] | None = None

    # ---- adapters ---------------------------------------------------------------------------------
    def add_adapter(self, name, r, lora_alpha, lora_dropout=0.0, use_rslora=False, init=True):
        super().add_adapter(name, r, lora_alpha, lora_dropout, use_rslora, init)
        # m starts at ||W + s B A||: the layer computes exactly what LoRA would (W + s B A) at step 0.
        self.lora_magnitude_vector[name] = nn.Parameter(self.weight_norm(name))

    def delete_adapter(self, name):
        super().delete_adapter(name)
        del self.lora_magnitude_vector[name]
        self._norm_cache.pop(name, None)

    def adapter_parameters(self, name):
        return [*super().adapter_parameters(name), self.lora_magnitude_vector[name]]

    def train(self, mode: bool = True):
        # Eval-mode norms are keyed by tensor versions, which some optimizers (fused AdamW) do not bump:
        # training in between must never leave a stale norm behind.
        self._norm_cache.clear()
        return super().train(mode)

    # ---- the norm ---------------------------------------------------------------------------------
    def _weight_matrix(self) -> torch.Tensor:
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight  # (d_out, d_in), a view

    @staticmethod
    def _fingerprint(*tensors: torch.Tensor) -> tuple:
        # In-place updates bump _version; moves and reassignments change data_ptr.
        return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)

    @torch.no_grad()
    def _row_norms_sq(self) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # inside a compiled layer the cache check (data pointers) would break the graph in every DoRA
            # module; one fused pass over the frozen weight per forward costs less than those breaks
            return self._weight_matrix().float().pow(2).sum(1)
        key = self._fingerprint(self.base_layer.weight)
        if self._weight_sq is None or self._weight_sq[0] != key:
            self._weight_sq = (key, self._weight_matrix().float().pow(2).sum(1))
        return self._weight_sq[1]

    @torch.no_grad()
    def weight_norm(self, name: str) -> torch.Tensor:
        """||W + s B A|| over each output row, (d_out,) fp32, without forming W + s B A.

        ||W_i + s (B A)_i||^2 = ||W_i||^2 + B_i . (2 s (W A^T)_i + s^2 (B A A^T)_i)

        A handful of (d_out, r) and (r, r) operations: this runs once per forward of every DoRA layer.
        """
        A, B = self.factors(name)
        s = self.scaling[name]
        W = self._weight_matrix()
        wa = F.linear(W, A.to(W.dtype)).to(B.dtype)  # W A^T: (d_out, r), in W's dtype (bf16 under bf16 compute)
        inner = torch.addmm(wa, B, A @ A.T, beta=2 * s, alpha=s * s)  # 2s W A^T + s^2 B (A A^T): (d_out, r)
        return (self._row_norms_sq() + torch.linalg.vecdot(B, inner)).clamp_min(0).sqrt()

    def _norm(self, name: str) -> torch.Tensor:
        if self.training:
            return self.weight_norm(name)
        A, B = self.factors(name)
        key = self._fingerprint(A, B, self.base_layer.weight) + (self.scaling[name],)
        cached = self._norm_cache.get(name)
        if cached is None or cached[0] != key:
            cached = self._norm_cache[name] = (key, self.weight_norm(name))
        return cached[1]

    # ---- forward ----------------------------------------------------------------------------------
    def _scale(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """g = m / ||W + s B A||, (d_out,): gradient flows into m only."""
        return (self.lora_magnitude_vector[name] / self._norm(name)).to(dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)  # W x + b, (..., d_out)
        if self.disabled:
            return result
        bias = self.bias
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            g = self._scale(name, result.dtype)
            dropout = self.lora_dropout[name]
            if isinstance(dropout, nn.Identity) or not self.training:
                # y = g (W x + s B A x) + b = g (result + s B A x) + (1 - g) b: one GEMM adds the branch into
                # the result (as LoRA does), one product applies g. A second adapter rescales the first's
                # output the same way, as in PEFT.
                result = g * self.add_update(result, x, name)
                if bias is not None:
                    result = result + (1 - g) * bias.to(result.dtype)
            else:  # as PEFT: DoRA's W x term sees the same dropped-out input as the LoRA branch
                A, B = self.factors(name)
                dropped = dropout(x)
                base = F.linear(dropped, self._weight_matrix().to(x.dtype))
                lora = F.linear(F.linear(dropped, A.to(x.dtype)), B.to(x.dtype)) * self.scaling[name]
                result = result + (g - 1) * base + g * lora.to(result.dtype)
        return result

    # ---- merging and files --------------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self, name):
        """W' - W for W' = g * (W + s B A), in the base weight's layout (fp32).

        The norm is taken on the weight before any merge (as PEFT does); W is the current weight.
        """
        A, B = self.factors(name)
        lora = (B.float() @ A.float()) * self.scaling[name]  # (d_out, d_in)
        original = self._unmerged_weight if self._unmerged_weight is not None else self.base_layer.weight
        original = (original.T if self.fan_in_fan_out else original).float()
        g = (self.lora_magnitude_vector[name].float() / torch.linalg.norm(original + lora, dim=1))[:, None]
        current = self._weight_matrix().float()
        delta = g * (current + lora) - current
        return delta.T if self.fan_in_fan_out else delta

    def to_peft(self, name):
        return {**super().to_peft(name), "lora_magnitude_vector": self.lora_magnitude_vector[name]}

    def peft_shapes(self, r):
        return {**super().peft_shapes(r), "lora_magnitude_vector": (self.out_features,)}

    @torch.no_grad()
    def load_peft(self, name, tensors):
        super().load_peft(name, tensors)
        self.lora_magnitude_vector[name].copy_(tensors["lora_magnitude_vector"])


def layer_class_for(name: str, module: nn.Module, layer_class: type[LoraLayer], use_dora: bool) -> type[LoraLayer]:
    """The LoRA layer class that `apply` uses for `module` given the config's use_dora.

    Args:
        name: the module's name (for messages).
        module: the module as it is now (a plain layer or a LoRA layer holding earlier adapters).
        layer_class: the class plain LoRA would use.
        use_dora: whether the new adapter is a DoRA adapter.

    Returns:
        DoraLinear for a DoRA adapter on a linear layer, else `layer_class`.

    Raises:
        LorakitError: DoRA on a non-linear layer, or DoRA and plain LoRA adapters on one module.
    """
    if not use_dora:
        if layer_class is DoraLinear:
            raise LorakitError(f"{name} holds DoRA adapters; a plain LoRA adapter cannot share it. "
                               "Use use_dora=True for this adapter too, or target other modules.")
        return layer_class
    if isinstance(module, DoraLinear):
        return DoraLinear
    if isinstance(module, LoraLayer) or layer_class is not Linear:
        what = "holds plain LoRA adapters" if isinstance(module, LoraLayer) else f"is a {type(module).__name__}"
        raise LorakitError(f"use_dora=True applies to linear layers without plain LoRA adapters; {name} {what}. "
                           "Narrow target_modules to linear layers, or apply the DoRA adapter to a fresh model.")
    return DoraLinear
