"""The roofline helpers: the GEMMs a step dispatches, their FLOPs, and their replay."""
import torch

from lorakit.tools.roofline import (
    capture_gemms,
    decode_limit_tokens_per_s,
    gemm_summary,
    replay_seconds,
)


def test_captures_forward_and_backward_products():
    layer = torch.nn.Linear(16, 32)
    x = torch.randn(8, 16, requires_grad=True)

    calls = capture_gemms(lambda: layer(x).sum().backward())
    # forward addmm (8x16 @ 16x32 + bias), backward: grad input (8x32 @ 32x16), grad weight (32x8 @ 8x16)
    assert sorted(c.op for c in calls) == ["addmm", "mm", "mm"]
    assert sum(c.flops for c in calls) == 3 * 2 * 8 * 16 * 32
    summary = gemm_summary(calls)
    assert summary["gemms"] == 3 and abs(summary["gflop"] - 3 * 2 * 8 * 16 * 32 / 1e9) < 1e-12


def test_batched_products_and_replay():
    a, b = torch.randn(3, 4, 5), torch.randn(3, 5, 6)
    calls = capture_gemms(lambda: torch.bmm(a, b))
    assert [c.op for c in calls] == ["bmm"] and calls[0].flops == 2 * 3 * 4 * 5 * 6
    assert calls[0].args[0][0] == (3, 4, 5) and calls[0].args[0][2] == torch.float32
    assert replay_seconds(calls, torch.device("cpu"), repeats=2) > 0


def test_products_into_a_given_buffer_count_too():
    # the fused loss writes the head's products into reused buffers (torch.mm(..., out=)): still GEMM time
    a, b, out = torch.randn(4, 5), torch.randn(5, 6), torch.empty(4, 6)
    calls = capture_gemms(lambda: (torch.mm(a, b, out=out), torch.bmm(a[None], b[None], out=out[None])))
    assert [c.op for c in calls] == ["mm", "bmm"] and calls[0].flops == 2 * 4 * 5 * 6
    assert [len(c.args) for c in calls] == [2, 2]  # the operands, not the buffer
    assert replay_seconds(calls, torch.device("cpu"), repeats=2) > 0


def test_the_fused_loss_products_are_in_the_limit():
    from lorakit.training.loss import LinearCrossEntropy

    hidden, head = torch.randn(6, 8, requires_grad=True), torch.randn(40, 8)
    calls = capture_gemms(lambda: LinearCrossEntropy.apply(hidden, head, torch.randint(0, 40, (6,)), 4).backward())
    assert sum(c.flops for c in calls) == 2 * (2 * 6 * 40 * 8)  # logits and the hidden states' gradient


def test_decode_limit():
    assert decode_limit_tokens_per_s(weight_bytes=2 * 10**8, bandwidth=3 * 10**10) == 150.0
