"""`--shard fsdp`: the model sharded across the processes of a torchrun world with PyTorch's FSDP2
(`torch.distributed.fsdp.fully_shard`), so a base too large for one device trains across N of them.

    each decoder block     one FSDP unit: its frozen base weights and its LoRA factors, sharded along dim 0
    the root (the model)   the rest: embeddings, final norm, output head

In forward and backward a unit's full weights exist only while it runs (all-gathered, then freed again);
FSDP reduce-scatters only gradients that exist, so only the LoRA factors' gradients travel. Everything
FSDP needs is set up here; the training loop sees a model it calls as before, plus `no_sync`,
`clip_gradients` and `full_trainable` (adapter and checkpoint files are written from full tensors, so a
checkpoint written by N processes resumes on any other number).

Traps this module steps around:
    * On the CPU FSDP gets a CPU device mesh (gloo); on CUDA a CUDA mesh (nccl).
    * gloo's reduce-scatter with ReduceOp.AVG sums instead (pytorch/pytorch#162338): reductions are forced to
      SUM followed by a division by the world size, on every backend, so the result is the mean everywhere.
    * Hooks run only when a module is *called*: the loss calls the model, never `.forward` or `.base_model`
      (`lorakit.training.loss` leaves its fused head to unsharded models).
    * The optimizer is built after sharding, over the sharded (DTensor) parameters.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from lorakit.core.errors import LorakitError
from lorakit.training.compiled_layers import decoder_layers
from lorakit.training.distributed import World

SHARD_CHOICES = ("none", "fsdp")


@dataclass(frozen=True)
class ShardOptions:
    """How FSDP shards and runs the model."""

    reshard_after_forward: bool = True   # free each block's gathered weights after its forward (less memory)
    cpu_offload: bool = False            # keep sharded parameters and gradients in CPU memory (CPUOffloadPolicy)
    compute_dtype: torch.dtype = torch.float32   # bf16/fp16: cast for compute; LoRA factors stay fp32


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated decoder blocks (the largest nn.ModuleList of same-type modules).

    Raises:
        LorakitError: no such list (the architecture has no recognizable blocks to shard one by one).
    """
    blocks = decoder_layers(model)
    if blocks is None:
        raise LorakitError(f"--shard fsdp found no list of decoder blocks in {type(model).__name__}; "
                           "it shards transformer models whose blocks sit in one nn.ModuleList.")
    return list(blocks)


def device_mesh(world: World):
    """A 1-D mesh over all processes, on the world's device type (CPU: gloo, CUDA: nccl)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(world.device.type, (world.size,))


def mixed_precision(options: ShardOptions):
    """bf16/fp16 compute with fp32 gradient reduction; None in fp32 (nothing to cast)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if options.compute_dtype == torch.float32:
        return None
    return MixedPrecisionPolicy(param_dtype=options.compute_dtype, reduce_dtype=torch.float32)


def check_quantized(model: nn.Module) -> None:
    """Refuse a quantized base FSDP cannot shard: int8, or NF4 whose codes are stored as bytes.

    FSDP shards and gathers floating parameters; NF4 codes stored in a float `quant_storage` dtype (the bits
    of the packed codes viewed as floats, as FSDP-QLoRA does) are such parameters, and their quantization
    state (block scales) stays whole on every rank. `--shard fsdp --quantize nf4` quantizes so.

    Raises:
        LorakitError: an int8 base, or NF4 stored as uint8.
    """
    from lorakit.core.layers import is_quantized

    for name, module in model.named_modules():
        if not is_quantized(module):
            continue
        if not module.weight.dtype.is_floating_point:
            kind = "NF4 codes stored as uint8" if module.weight.dtype == torch.uint8 else "an int8 base"
            raise LorakitError(
                f"--shard fsdp cannot shard {name} ({kind}): FSDP shards floating parameters only. Use "
                "--quantize nf4 (lorakit then stores the 4-bit codes in the compute dtype, as FSDP-QLoRA does), "
                "or quantize_model(..., quant_storage=<compute dtype>) when building the model yourself.")


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def bound_cpu_heap(threshold: int = 128 * 1024) -> bool:
    """Give every allocation above `threshold` bytes its own mapping, returned to the OS when freed.

    Why: glibc raises its mmap threshold as large blocks are freed, then keeps freed tensors in its heap;
    a sharded CPU run allocates and frees the gathered blocks every step, so without this its resident
    set grows by hundreds of MB with no live tensor behind it (benchmarks/fsdp_memory.py measures both).
    Setting the threshold fixes it and turns off glibc's adjustment (as MALLOC_MMAP_THRESHOLD_ does).

    Returns:
        Whether it was set (False where the C library is not glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def shard_model(model: nn.Module, world: World, options: ShardOptions) -> nn.Module:
    """Shard `model` in place: every decoder block, then the root. Call after the methods are applied
    (their factors shard with the block they sit in) and before the optimizer is built.

    Returns:
        The model (its class is now FSDP's subclass of the original; call it as before).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    check_quantized(model)
    if world.device.type == "cpu":
        bound_cpu_heap()
    kwargs = {"mesh": device_mesh(world),
              "offload_policy": CPUOffloadPolicy(pin_memory=world.device.type == "cuda") if options.cpu_offload else OffloadPolicy()}
    policy = mixed_precision(options)
    if policy is not None:
        kwargs["mp_policy"] = policy
    for block in decoder_blocks(model):
        fully_shard(block, reshard_after_forward=options.reshard_after_forward, **kwargs)
    fully_shard(model, **kwargs)
    # SUM then divide by the world size: gloo's AVG reduce-scatter sums (pytorch/pytorch#162338).
    model.set_force_sum_reduction_for_comms(True)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate this micro-batch's gradients locally, without reduce-scatter (FSDP's DDP.no_sync)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> float:
    """Scale the gradients so that their global norm is at most `max_norm`; returns the norm before.

    Sharded gradients' norms are reduced over all processes (every process must call this)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    total = float(norm)
    if math.isfinite(max_norm) and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for g in grads:
            g.mul_(coef)
    return total


def local_bytes(model: nn.Module, trainable: bool = False) -> int:
    """Bytes of parameter storage this process holds (its shards under FSDP): the frozen base's by default,
    the trainable parameters' with trainable=True."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        if p.requires_grad == trainable:
            local = p.to_local() if isinstance(p, DTensor) else p
            total += local.numel() * local.element_size()
    return total


class ShardedStep(nn.Module):
    """The training step module (model + loss) over a sharded model, with DDP's `no_sync` for accumulation."""

    def __init__(self, step_module: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.step_module = step_module
        self.sharded = [model]   # a list: not registered as a submodule a second time

    def forward(self, *args, **kwargs):
        return self.step_module(*args, **kwargs)

    def no_sync(self):
        return no_sync(self.sharded[0])


@contextlib.contextmanager
def full_trainable(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Iterator[None]:
    """Within the block, the trainable parameters (and their optimizer state) are plain full tensors, as in a
    single-process run: adapters and checkpoints are written, and checkpoints read, as they are there. On
    leaving, the values (changed or not) go back into each process's shards. Every process must enter
    (gathering is collective); only the trainable parameters are gathered, never the base. A no-op for an
    unsharded model."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.tensor import DTensor

    full: dict[int, nn.Parameter] = {}       # id(sharded parameter) -> its full copy (tied ones once)
    sharded: dict[int, DTensor] = {}
    slots = []                              # (module, name, sharded parameter)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor) and p.requires_grad:
                if id(p) not in full:
                    full[id(p)] = nn.Parameter(p.full_tensor().detach().clone())
                    sharded[id(p)] = p
                slots.append((module, name, p))
                module._parameters[name] = full[id(p)]
    if optimizer is not None:
        swap_optimizer(optimizer, {i: full[i] for i in full}, {i: sharded[i] for i in sharded}, gather=True)
    try:
        yield
    finally:
        with torch.no_grad():
            for i, p in sharded.items():
                p.to_local().copy_(shard_like(full[i].detach(), p).to_local())
        for module, name, p in slots:
            module._parameters[name] = p
        if optimizer is not None:
            swap_optimizer(optimizer, {id(full[i]): sharded[i] for i in full}, {id(full[i]): full[i] for i in full},
                           gather=False)


def shard_like(tensor: torch.Tensor, like) -> torch.Tensor:
    """`tensor` (full, the same on every process) as a DTensor placed as `like`; no communication."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor, like.device_mesh, like.placements, src_data_rank=None)


def swap_optimizer(optimizer: torch.optim.Optimizer, new: dict[int, nn.Parameter], old: dict[int, nn.Parameter],
                   gather: bool) -> None:
    """Point the optimizer from parameters `old` to `new` (both by the id of the old one), converting its
    per-parameter state: gathered to full tensors (gather=True), or sharded like the new parameter."""
    from torch.distributed.tensor import DTensor

    for group in optimizer.param_groups:
        group["params"] = [new.get(id(p), p) for p in group["params"]]
    for key, param in new.items():
        state = optimizer.state.pop(old[key], None)
        if state is None:
            continue
        converted = {}
        for name, value in state.items():
            if gather and isinstance(value, DTensor):
                value = value.full_tensor()
            elif not gather and torch.is_tensor(value) and value.shape == param.shape and value.dim() > 0:
                value = shard_like(value.to(param.to_local().device), param)
            converted[name] = value
        optimizer.state[param] = converted


def shard_report(model: nn.Module, world: World) -> dict:
    """What each process holds after sharding, in bytes: the base's whole size and every rank's share of it
    (and of the trainable parameters), read from the local shards. Every process must call this."""
    import torch.distributed as dist

    mine = torch.tensor([local_bytes(model), local_bytes(model, trainable=True)], dtype=torch.int64)
    ranks = [torch.zeros_like(mine) for _ in range(world.size)]
    dist.all_gather(ranks, mine)
    whole = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return {"world_size": world.size, "base_bytes": whole,
            "base_bytes_per_rank": [int(r[0]) for r in ranks],
            "trainable_bytes_per_rank": [int(r[1]) for r in ranks]}
