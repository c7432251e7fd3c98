"""`lorakit bench serve` on a tiny model with a small workload: every configuration runs and reports what it
should; the workload is fixed by its seed. Speed targets live in the benchmark itself, never in tests."""
from __future__ import annotations

import json
import time

import pytest

from lorakit import LorakitError
from lorakit.cli.main import main
from lorakit.tools.bench_serve import decode_table, run_config, serve_table
from lorakit.tools.serve_workload import BenchServeConfig, make_workload, serve_one_adapter_at_a_time

SMALL = dict(requests=6, min_prompt_tokens=4, max_prompt_tokens=12, new_tokens=5, adapters=3, concurrency=3,
             decode_tokens=6, agreement_requests=3, device="cpu")


def small(model_dir, **kw) -> BenchServeConfig:
    return BenchServeConfig(model=str(model_dir), **{**SMALL, **kw})


def test_the_cli_runs_each_workload_configuration_in_its_own_process(tiny_model_dir, capsys):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items() if k != "agreement_requests"]
    assert main(["bench", "serve", "--model", str(tiny_model_dir), *flags, "--configs",
                 "base,mixed,swap,swap-grouped,peft", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["configs"]) == ["base", "mixed", "swap", "swap-grouped", "peft"]
    for name, r in out["configs"].items():
        assert r["output_tokens"] == SMALL["requests"] * SMALL["new_tokens"], name  # the same work in each
        assert r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0
        assert 0 < r["ttft_s"]["p50"] <= r["ttft_s"]["p95"] and 0 < r["tpot_s"]["p50"] <= r["tpot_s"]["p95"]
    assert out["configs"]["mixed"]["adapters"] == 3 and out["configs"]["base"]["adapters"] == 0
    assert "| mixed |" in serve_table(out["configs"])


@pytest.mark.parametrize("name", ["decode-base", "decode-unmerged", "decode-merged", "decode-generate", "bandwidth",
                                  "llama.cpp"])
def test_each_batch1_row_reports_tokens_per_second_or_why_not(tiny_model_dir, name):
    r = run_config(name, small(tiny_model_dir))
    if name == "llama.cpp":  # a Hugging Face directory has no GGUF file for llama.cpp (or it is not installed)
        assert "skipped" in r and "skipped" in decode_table({name: r})
        return
    assert r["tokens_per_s"] > 0 and r["note"]
    if name == "bandwidth":
        assert r["weight_bytes"] > 0 and r["bandwidth_bytes_per_s"] > 1e8
        assert r["tokens_per_s"] == pytest.approx(r["bandwidth_bytes_per_s"] / r["weight_bytes"])


def test_agreement_compares_the_mixed_batch_with_generate(tiny_model_dir):
    r = run_config("agreement", small(tiny_model_dir, precision="fp32"))
    assert r["requests"] == 3 and r["dtype"] == "float32"
    assert r["identical_requests"] == 3 and r["matching_token_fraction"] == 1.0  # fp32: exactly the same tokens


def test_the_workload_is_fixed_by_its_seed(smollm_tokenizer):
    cfg = BenchServeConfig(requests=50, min_prompt_tokens=32, max_prompt_tokens=64, adapters=4, distribution="zipf")
    first, again = make_workload(cfg, smollm_tokenizer, 4), make_workload(cfg, smollm_tokenizer, 4)
    assert first == again
    assert all(32 <= len(p) <= 64 for p in first.prompts) and set(first.adapter_of) <= {0, 1, 2, 3}
    assert first.adapter_of.count(0) > first.adapter_of.count(3)  # Zipf: the first adapter is the most asked for
    other = make_workload(BenchServeConfig(**{**cfg.__dict__, "seed": 1}), smollm_tokenizer, 4)
    assert other.prompts != first.prompts
    with pytest.raises(LorakitError, match="prompt lengths"):
        make_workload(BenchServeConfig(min_prompt_tokens=10, max_prompt_tokens=5), smollm_tokenizer, 1)


def test_unknown_configurations_are_refused(tiny_model_dir):
    with pytest.raises(LorakitError, match="unknown bench serve configuration"):
        run_config("fastest", small(tiny_model_dir))


class _CountingEngine:
    """Stands in for the engine: each request runs `len(prompt)` steps; notes which adapters ran in each step."""

    class Handle:
        def __init__(self, request) -> None:
            self.request, self.left = request, len(request.prompt)

        @property
        def done(self) -> bool:
            return self.left == 0

    def __init__(self) -> None:
        self.running, self.steps = [], []

    def submit(self, request):
        self.running.append(self.Handle(request))
        return self.running[-1]

    def step(self) -> None:
        time.sleep(0.002)
        self.steps.append([h.request.adapter for h in self.running])
        for h in self.running:
            h.left -= 1
        self.running = [h for h in self.running if not h.done]


def test_swap_runs_one_adapter_at_a_time_under_the_same_clients():
    from lorakit.serve import Request

    adapters = ["a", "b", "a", "a", "c", "b", "a", "c", "a", "b"]
    requests = [Request([0] * (2 + k % 3), adapter=name) for k, name in enumerate(adapters)]
    engine = _CountingEngine()
    handles, waited = serve_one_adapter_at_a_time(engine, requests, concurrency=4)
    assert sorted(id(h.request) for h in handles) == sorted(id(r) for r in requests)  # every request, once
    assert all(len(set(step)) == 1 and len(step) <= 4 for step in engine.steps)  # one adapter per batch
    assert engine.steps[0] == ["a", "a", "a"]  # the oldest request's adapter, with the other waiting "a"s
    assert any(len(step) > 1 and step[0] == "b" for step in engine.steps)  # later "b"s batch together
    assert set(waited) == {id(h) for h in handles}
    first_b = next(h for h in handles if h.request is requests[1])
    assert waited[id(first_b)] >= 0.004  # it waited through the "a" batch (>= 2 steps): part of its TTFT
