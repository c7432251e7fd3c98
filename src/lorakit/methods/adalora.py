"""AdaLoRA (Zhang et al., 2023): the rank of each module is learned while training (`--method adalora`).

Each adapted linear layer's update is parameterized like an SVD with R = --init-r triplets,

    dW = scaling * P diag(lam) Q        P: d_out x R (lora_B), lam: R (lora_E), Q: R x d_in (lora_A)

and a regularizer orth_reg_weight * mean(||Q Q^T - I||_F, ||P^T P - I||_F) keeps P and Q near orthonormal,
so lam_i is close to the size of triplet i. After every optimizer step each parameter w gets a smoothed
sensitivity score,

    s = |w * dL/dw|,   Ibar <- beta Ibar + (1 - beta) s,   Ubar <- beta Ubar + (1 - beta) |s - Ibar|,
    score(w) = Ibar * Ubar,    S_i = score(lam_i) + mean_j score(Q_ij) + mean_j score(P_ji),

and the `budget(t)` best triplets of the whole model are kept (the others' lam_i are set to 0). The
budget falls from R per module to --target-r per module on a cubic schedule between --prune-start and
--prune-end (fractions of the run); after that the kept set is fixed. The saved adapter holds only the
kept triplets: a standard LoRA (A = Q_kept, B = P_kept diag(lam_kept)) with an exact rank_pattern entry
per module, which PEFT and plain lorakit load.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.active import lora_configs
from lorakit.core.config import config_for_ranks, file_scaling
from lorakit.core.errors import LorakitError
from lorakit.core.inject import find_targets
from lorakit.core.io import PREFIX, write_adapter_files
from lorakit.core.layers import Linear, LoraLayer
from lorakit.methods.base import ParameterGroup, options_from
from lorakit.methods.lora import ADAPTER, LoraMethod, LoraOptions, lora_groups


@dataclass
class AdaLoraOptions:
    """AdaLoRA's rank schedule (its targets, scaling and dropout are the LoRA options')."""

    init_r: int = 12
    """AdaLoRA (--method adalora): singular triplets per module at the start."""
    target_r: int = 4
    """AdaLoRA: average triplets per module left after pruning (the total budget is target_r x modules)."""
    prune_start: float = 0.1
    """AdaLoRA: fraction of the run before pruning starts (importance scores warm up)."""
    prune_end: float = 0.7
    """AdaLoRA: fraction of the run at which the budget reaches target_r; the kept set is fixed after it."""
    importance_beta: float = 0.85
    """AdaLoRA: smoothing of the importance scores and their uncertainty (exponential moving averages)."""
    orth_reg_weight: float = 0.5
    """AdaLoRA: weight of the penalty keeping the singular vectors orthonormal."""


class SVDLinear(Linear):
    """A linear layer's LoRA with the update scaling * B diag(E) A (A = Q, E = lambda, B = P); E starts at 0."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_E = nn.ParameterDict()

    def add_adapter(self, name, r, lora_alpha, lora_dropout=0.0, use_rslora=False, init=True):
        super().add_adapter(name, r, lora_alpha, lora_dropout, use_rslora, init)
        self.lora_E[name] = nn.Parameter(torch.zeros(r, dtype=self.lora_A[name].dtype, device=self.lora_A[name].device))

    def delete_adapter(self, name):
        super().delete_adapter(name)
        del self.lora_E[name]

    def adapter_parameters(self, name):
        return [*self.factors(name), self.lora_E[name]]

    # Linear fuses B A into one GEMM with the addition; the update here also carries diag(E).
    add_update = LoraLayer.add_update

    @torch.no_grad()
    def init_factors(self, name, init):
        # As PEFT's AdaLoRA: P and Q small Gaussians, lambda zero, so the update starts at exactly 0.
        A, B = self.factors(name)
        nn.init.normal_(A, std=0.02)
        nn.init.normal_(B, std=0.02)

    def lora_branch(self, x, name):
        A, B = self.factors(name)
        E = self.lora_E[name]
        x = self.lora_dropout[name](x)
        # (..., d_in) -> (..., R) -> (..., d_out); diag(E) is folded into the rows of A.
        return F.linear(F.linear(x, (A * E[:, None]).to(x.dtype)), B.to(x.dtype)) * self.scaling[name]

    def delta_weight(self, name):
        A, B = self.factors(name)
        delta = (B.float() @ (A.float() * self.lora_E[name].float()[:, None])) * self.scaling[name]  # (d_out, d_in)
        return delta.T if self.fan_in_fan_out else delta

    def to_peft(self, name):
        # The same update as a plain rank-R LoRA (B diag(E), A), for code that saves any LoRA layer.
        A, B = self.factors(name)
        return {"lora_A.weight": A, "lora_B.weight": B * self.lora_E[name][None, :]}


def check_config(lora: LoraOptions, options: AdaLoraOptions) -> None:
    """Reject AdaLoRA settings that cannot work, before any model is loaded.

    Raises:
        LorakitError: naming the flag and the accepted range.
    """
    if not 1 <= options.target_r <= options.init_r:
        raise LorakitError(f"AdaLoRA needs 1 <= --target-r <= --init-r; got --target-r {options.target_r}, "
                           f"--init-r {options.init_r}.")
    if not 0 <= options.prune_start < options.prune_end <= 1:
        raise LorakitError(
            f"AdaLoRA needs 0 <= --prune-start < --prune-end <= 1 (fractions of the run); "
            f"got {options.prune_start} and {options.prune_end}."
        )
    if not 0 <= options.importance_beta < 1:
        raise LorakitError(f"--importance-beta must be in [0, 1), e.g. 0.85; got {options.importance_beta}.")
    if options.orth_reg_weight < 0:
        raise LorakitError(f"--orth-reg-weight must be >= 0, e.g. 0.5; got {options.orth_reg_weight}.")
    if lora.init_lora_weights == "pissa":
        raise LorakitError("--init-lora-weights pissa does not apply to AdaLoRA (it has its own init); drop the flag.")


def budget_at(step: int, total_steps: int, init_budget: int, target_budget: int,
              prune_start: float, prune_end: float) -> int:
    """The number of triplets AdaLoRA keeps after optimizer step `step` (1-based).

    init_budget up to step round(prune_start * total_steps); then a cubic fall,
    target + (init - target) * (1 - progress)^3, fast at first while the scores are rough, slow
    near the end; target_budget from step round(prune_end * total_steps) on.

    Args:
        step: the step just taken.
        total_steps: the steps of the run.
        init_budget: init_r x adapted modules.
        target_budget: target_r x adapted modules.
        prune_start: fraction of the run before pruning starts.
        prune_end: fraction of the run at which the budget reaches its target.

    Returns:
        The budget, in [target_budget, init_budget].
    """
    start, end = round(prune_start * total_steps), max(round(prune_end * total_steps), 1)
    if step >= end:
        return target_budget
    if step <= start:
        return init_budget
    progress = (step - start) / (end - start)
    return target_budget + int((init_budget - target_budget) * (1 - progress) ** 3)


def select_triplets(scores: list[torch.Tensor], budget: int) -> list[torch.Tensor]:
    """Masks keeping the `budget` highest-scoring triplets over all modules (exactly `budget`, ties broken by index).

    Args:
        scores: one (R,) score vector per module.
        budget: how many triplets to keep in total.

    Returns:
        One (R,) bool mask per module.
    """
    flat = torch.cat(scores)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, min(budget, flat.numel()), sorted=False).indices] = True
    return list(keep.split([s.numel() for s in scores]))


class AdaLoraMethod(LoraMethod):
    """`--method adalora` (see the module docstring): a LoRA whose per-module ranks are learned. It reads the
    run's AdaLoraOptions and LoraOptions, and writes, loads, merges and describes itself as a LoRA."""

    name = "adalora"
    options = AdaLoraOptions

    def __init__(self, cfg: Any) -> None:
        self.adalora = options_from(cfg, AdaLoraOptions)
        check_config(options_from(cfg, LoraOptions), self.adalora)
        super().__init__(cfg)
        self.layers: list[tuple[str, SVDLinear]] = []
        self.kept: dict[str, torch.Tensor] = {}         # module path -> (R,) bool; absent: all kept
        self.final = False                              # the kept set is fixed (the budget reached its target)
        self._last_step: int | None = None
        self._start_kept: dict[nn.Parameter, torch.Tensor] = {}   # lambda -> (R,) bool, before the first step
        self._grads: dict[nn.Parameter, torch.Tensor] = {}
        self._ema: dict[nn.Parameter, tuple[torch.Tensor, torch.Tensor]] = {}  # param -> (Ibar, Ubar)

    # ---- Method ---------------------------------------------------------------------------------------
    def apply(self, model: nn.Module, source: str) -> None:
        """Wrap every targeted linear layer in an `SVDLinear` with R = init_r; freeze everything else."""
        config = self.config.replace(r=self.adalora.init_r, base_model_name_or_path=source)
        for target in find_targets(model, config):
            if isinstance(target.module, LoraLayer):
                raise LorakitError(f"{target.name} already has LoRA; AdaLoRA cannot share a module with another method.")
            if target.layer_class is not Linear:
                raise LorakitError(
                    f"AdaLoRA adapts linear layers only, and {target.name} is a {type(target.module).__name__}; "
                    "narrow --target-modules to linear layers (or all-linear)."
                )
            layer = SVDLinear(target.module)
            layer.add_adapter(ADAPTER, target.r, target.lora_alpha, config.lora_dropout, config.use_rslora)
            model.set_submodule(target.name, layer)
            self.layers.append((target.name, layer))
        lora_configs(model)[ADAPTER] = config
        model.requires_grad_(False)
        for _, layer in self.layers:
            for param in self._params(layer):
                param.requires_grad_(True)
                # Importance needs each step's gradient, but the training loop clears gradients before
                # after_step; keep a reference to the final accumulated (and clipped) one.
                param.register_post_accumulate_grad_hook(self._remember_grad)
            layer.lora_E[ADAPTER].register_post_accumulate_grad_hook(self._remember_start)

    def parameter_groups(self, model: nn.Module) -> list[ParameterGroup]:
        """P (lora_B) at --loraplus-lr-ratio as LoRA's B; Q and lambda at 1."""
        return lora_groups([layer for _, layer in self.layers], self.lora.loraplus_lr_ratio)

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """orth_reg_weight x the mean of ||Q Q^T - I||_F and ||P^T P - I||_F over modules."""
        if self.adalora.orth_reg_weight == 0:
            return None
        total = 0.0
        for _, layer in self.layers:
            A, B = layer.factors(ADAPTER)
            eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
            total = total + torch.linalg.matrix_norm(A @ A.T - eye) + torch.linalg.matrix_norm(B.T @ B - eye)
        return self.adalora.orth_reg_weight * total / (2 * len(self.layers))

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Update the importance scores and mask every module down to this step's budget."""
        # A run resumed from a checkpoint calls first with a later step; the scores start afresh then.
        resumed, self._last_step = self._last_step is None and step > 1, step
        if self.final:
            self._mask()
            return
        scores = self._update_scores()
        n = len(self.layers)
        options = self.adalora
        budget = budget_at(step, total_steps, options.init_r * n, options.target_r * n,
                           options.prune_start, options.prune_end)
        if budget == options.init_r * n:
            return
        self.final = budget == options.target_r * n
        if resumed and self.final:
            # Past the pruning phase the checkpoint's lambdas hold the fixed kept set (see _remember_start).
            masks = [self._start_kept[layer.lora_E[ADAPTER]] for _, layer in self.layers]
        else:
            masks = select_triplets(scores, budget)
        self.kept = {name: mask for (name, _), mask in zip(self.layers, masks)}
        self._mask()

    def save(self, model: nn.Module, directory: Path) -> None:
        """Write the kept triplets as a standard LoRA adapter with per-module ranks (PEFT format)."""
        kept = {name: self.kept.get(name, torch.ones(layer.r[ADAPTER], dtype=torch.bool)) for name, layer in self.layers}
        ranks = {name: int(mask.sum()) for name, mask in kept.items() if mask.any()}
        config = config_for_ranks(lora_configs(model)[ADAPTER], ranks, same_targets=len(ranks) == len(self.layers))
        config = config.replace(fan_in_fan_out=any(layer.fan_in_fan_out for _, layer in self.layers))
        tensors = {}
        for name, layer in self.layers:
            if name not in ranks:
                continue  # every triplet pruned: the module is left out of the adapter
            A, B = layer.factors(ADAPTER)
            mask, E = kept[name].to(A.device), layer.lora_E[ADAPTER]
            # scaling * B diag(E) A over the kept triplets, with the scaling of the written rank folded into B.
            rescale = layer.scaling[ADAPTER] / file_scaling(config, ranks[name])
            tensors[f"{PREFIX}{name}.lora_A.weight"] = A[mask].detach().clone()
            tensors[f"{PREFIX}{name}.lora_B.weight"] = (B[:, mask] * E[mask] * rescale).detach().clone()
        write_adapter_files(directory, config.to_dict(), tensors)

    # ---- internals ------------------------------------------------------------------------------------
    @staticmethod
    def _params(layer: SVDLinear) -> list[nn.Parameter]:
        """[A (Q), B (P), E (lambda)]."""
        return layer.adapter_parameters(ADAPTER)

    def _remember_grad(self, param: nn.Parameter) -> None:
        self._grads[param] = param.grad

    def _remember_start(self, lam: nn.Parameter) -> None:
        # Until this process's first optimizer step, lambda is as the run started or as a checkpoint
        # left it: a resumed run reads its fixed kept set from it (pruned lambdas are exactly 0).
        if self._last_step is None:
            self._start_kept.setdefault(lam, lam.detach() != 0)

    def _score(self, param: nn.Parameter) -> torch.Tensor:
        """Ibar * Ubar of `param` after folding in this step's sensitivity |w * grad| (zeros without a gradient)."""
        grad = self._grads.pop(param, None)
        sensitivity = (param * grad).abs() if grad is not None else torch.zeros_like(param)
        ibar, ubar = self._ema.get(param, (torch.zeros_like(param), torch.zeros_like(param)))
        beta = self.adalora.importance_beta
        ibar = beta * ibar + (1 - beta) * sensitivity
        ubar = beta * ubar + (1 - beta) * (sensitivity - ibar).abs()
        self._ema[param] = (ibar, ubar)
        return ibar * ubar

    def _update_scores(self) -> list[torch.Tensor]:
        """One (R,) triplet score per module: score(lambda_i) + mean over Q's row i + mean over P's column i."""
        scores = []
        for _, layer in self.layers:
            A, B, E = self._params(layer)
            scores.append(self._score(E) + self._score(A).mean(dim=1) + self._score(B).mean(dim=0))
        return scores

    def _mask(self) -> None:
        """lambda_i = 0 for every pruned triplet (the optimizer moved it this step; the forward must not see it)."""
        for name, layer in self.layers:
            if name in self.kept:
                layer.lora_E[ADAPTER].masked_fill_(~self.kept[name].to(layer.lora_E[ADAPTER].device), 0.0)
