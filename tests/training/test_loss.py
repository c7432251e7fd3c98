"""The optimized paths equal the plain ones: fused linear cross-entropy, the one-GEMM LoRA update,
fused AdamW. Losses and the gradients of A and B are compared on a tiny model."""
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_lora, tiny_llama

import lorakit
from lorakit import LoraConfig
from lorakit.training.loss import LinearCrossEntropy, loss_sum


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (3, 16), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a masked prompt
    labels[2, 10:] = -100
    return ids, torch.ones_like(ids), labels


def _plain_loss(model, ids, mask, labels):
    # what transformers users write: full logits, fp32 cross-entropy, mean over labelled tokens
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def _lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_lorakit_loss_and_grads_equal_plain_path(dtype, tol):
    ids, mask, labels = _batch()
    results = []
    for path in ("plain", "lorakit"):
        model = tiny_llama().to(dtype)
        lorakit.apply(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        randomize_lora(model)
        if path == "plain":
            loss = _plain_loss(model, ids, mask, labels)
        else:
            total, n = loss_sum(model, ids, mask, labels, chunk_tokens=7)  # several chunks
            loss = total / n
        loss.backward()
        results.append((loss.detach(), _lora_grads(model)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a.float(), atol=tol, rtol=tol)
    assert grads_a.keys() == grads_b.keys() and any("lora_A" in k for k in grads_a)
    for k in grads_a:
        scale = grads_a[k].abs().max().clamp_min(1e-8)
        assert ((grads_b[k] - grads_a[k]).abs().max() / scale) < (1e-4 if dtype == torch.float32 else 5e-2), k


def test_linear_cross_entropy_weight_gradient():
    torch.manual_seed(0)
    h = torch.randn(10, 6, requires_grad=True)
    w = torch.randn(20, 6, requires_grad=True)
    y = torch.randint(0, 20, (10,))
    ours = LinearCrossEntropy.apply(h, w, y, 3)
    (ours * 2).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.T, y, reduction="sum")
    (ref * 2).backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


def test_one_gemm_update_equals_branch():
    torch.manual_seed(0)
    layer = lorakit.core.layers.Linear(torch.nn.Linear(12, 9))
    layer.add_adapter("default", r=3, lora_alpha=6)
    randomize_lora(layer)
    x = torch.randn(2, 5, 12)
    fused = layer(x)
    plain = layer.base_layer(x) + layer.lora_branch(x, "default")
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)


def test_fused_adamw_matches_plain():
    torch.manual_seed(0)
    params_a = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    opt_a = torch.optim.AdamW(params_a, lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(params_b, lr=1e-2, weight_decay=0.1, fused=True)
    for step in range(3):
        for pa, pb in zip(params_a, params_b):
            g = torch.randn(4, 3, generator=torch.Generator().manual_seed(step))
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(params_a, params_b):
        torch.testing.assert_close(pa, pb)


def test_every_chunk_candidate_gives_the_same_loss_and_gradient(tmp_path, monkeypatch):
    from lorakit.core import autotune
    from lorakit.training.loss import CHUNK_CANDIDATES, LinearCrossEntropy, choose_chunk

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 8, generator=g)
    targets = torch.randint(0, 40, (600,), generator=g)
    results = []
    for chunk in CHUNK_CANDIDATES:
        hidden = torch.randn(600, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
        loss = LinearCrossEntropy.apply(hidden, weight, targets, chunk)
        loss.backward()
        results.append((loss.detach(), hidden.grad))
    for loss, grad in results[1:]:
        assert torch.allclose(loss, results[0][0], rtol=1e-5) and torch.allclose(grad, results[0][1], atol=1e-6)
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    autotune.forget_process_decisions()
    assert choose_chunk(weight, tokens=64) in CHUNK_CANDIDATES


def test_a_decided_chunk_costs_no_measuring_inputs(tmp_path, monkeypatch):
    # loss_sum asks for the chunk every step: once decided, nothing head-sized may be built again
    from lorakit.core import autotune
    from lorakit.training.loss import CHUNK_CANDIDATES, choose_chunk

    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    autotune.forget_process_decisions()
    weight = torch.randn(40, 8)
    first = choose_chunk(weight, tokens=64)
    monkeypatch.setattr(torch, "randn", lambda *a, **k: pytest.fail("built measuring inputs for a decided chunk"))
    assert choose_chunk(weight, tokens=64) == first in CHUNK_CANDIDATES
