"""llama.cpp's Q/K row order: rotating adjacent pairs of the permuted rows is HF's rotate-half of the original."""
import pytest
import torch

from lorakit import LorakitError
from lorakit.tools.export_gguf.names import TensorNames, arch_for
from lorakit.tools.export_gguf.permute import permute_rows, to_llama_cpp_rows


def rotate_half_rope(q, cos, sin):  # transformers' Llama: dims i and i + d/2 form a pair
    half = q.shape[-1] // 2
    return q * torch.cat([cos, cos], -1) + torch.cat([-q[..., half:], q[..., :half]], -1) * torch.cat([sin, sin], -1)


def adjacent_pairs_rope(q, cos, sin):  # llama.cpp's LLAMA graph: dims 2i and 2i + 1 form a pair
    even, odd = q[..., 0::2], q[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)


@pytest.mark.parametrize("n_head", [1, 3, 4])
def test_permuted_rows_under_llama_cpp_rope_equal_hf_rope_permuted(n_head):
    head_dim, d_in = 8, 5
    W = torch.randn(n_head * head_dim, d_in, dtype=torch.float64)
    x = torch.randn(d_in, dtype=torch.float64)
    angle = torch.rand(head_dim // 2, dtype=torch.float64) * 6
    cos, sin = angle.cos(), angle.sin()
    hf = rotate_half_rope((W @ x).view(n_head, head_dim), cos, sin).flatten()
    cpp = adjacent_pairs_rope((permute_rows(W, n_head) @ x).view(n_head, head_dim), cos, sin).flatten()
    assert torch.allclose(cpp, permute_rows(hf.unsqueeze(1), n_head).squeeze(1))
    # attention scores q . k are what matters, and the same permutation on q and k keeps them
    assert torch.allclose(cpp @ cpp, hf @ hf)


def test_k_uses_the_key_value_heads_and_v_is_left_alone():
    config = {"num_attention_heads": 4, "num_key_value_heads": 2}
    K, V = torch.randn(2 * 8, 3), torch.randn(2 * 8, 3)
    assert torch.equal(to_llama_cpp_rows("model.layers.0.self_attn.k_proj.weight", K, config, True), permute_rows(K, 2))
    assert not torch.equal(permute_rows(K, 2), permute_rows(K, 4))  # a GQA model's K by 4 heads would be wrong
    assert to_llama_cpp_rows("model.layers.0.self_attn.v_proj.weight", V, config, True) is V
    assert to_llama_cpp_rows("model.layers.0.self_attn.k_proj.weight", K, config, False) is K  # QWEN2: NeoX rope


def test_names_come_from_gguf_py_table_and_other_models_are_refused():
    names = TensorNames(arch_for({"model_type": "llama"}), 2)
    assert names["model.layers.1.self_attn.q_proj.weight"] == "blk.1.attn_q.weight"
    assert names["model.layers.0.mlp.down_proj.weight"] == "blk.0.ffn_down.weight"
    assert names["model.embed_tokens.weight"] == "token_embd.weight"
    assert arch_for({"model_type": "qwen2"}).permute_qk is False
    with pytest.raises(LorakitError, match="gpt2.*lorakit merge"):
        arch_for({"model_type": "gpt2"})
