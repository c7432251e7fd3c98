"""Sampling: greedy rows take the argmax; top-k/top-p keep what they should; a seed fixes the draws."""
from __future__ import annotations

import torch

from lorakit.serve.requests import SamplingParams
from lorakit.serve.sampling import filtered_probs, make_generator, sample


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    assert torch.count_nonzero(filtered_probs(logits, SamplingParams(temperature=1, top_k=2))) == 2
    probs = filtered_probs(logits, SamplingParams(temperature=1, top_p=0.8))
    assert torch.nonzero(probs).flatten().tolist() == [0, 1, 2]  # 0.5 + 0.2 < 0.8 <= 0.5 + 0.2 + 0.15
    assert torch.allclose(probs.sum(), torch.tensor(1.0))
    assert torch.allclose(probs[:3], torch.tensor([0.5, 0.2, 0.15]) / 0.85)


def test_sampling_follows_the_distribution_and_seeds_repeat():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(4000, 1)
    params = [SamplingParams(temperature=1.0, seed=3)] * 4000
    generator = make_generator(params[0], torch.device("cpu"))
    tokens = sample(logits, params, [generator] * 4000)
    freq = torch.bincount(torch.tensor(tokens), minlength=3) / 4000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)
    again = [sample(logits[:1], params[:1], [make_generator(params[0], torch.device("cpu"))])[0] for _ in range(5)]
    assert len(set(again)) == 1


def test_greedy_rows_take_the_argmax_and_draw_nothing():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 0.0]])
    greedy = SamplingParams()
    assert make_generator(greedy, torch.device("cpu")) is None
    assert sample(logits, [greedy, greedy], [None, None]) == [1, 0]
