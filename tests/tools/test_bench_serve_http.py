"""`lorakit bench serve --http` and `lorakit bench serve-load` on a tiny model with a small workload: the
server runs as its own process, every request is answered in full, and the figures are reported. Speed
targets live in the benchmark itself, never in tests."""
from __future__ import annotations

from lorakit.tools.bench_serve import run_config, serve_table
from lorakit.tools.bench_serve_http import BenchServeLoadConfig, load_run
from lorakit.tools.serve_workload import BenchServeConfig

SMALL = dict(requests=6, min_prompt_tokens=4, max_prompt_tokens=12, new_tokens=5, adapters=3, concurrency=3, device="cpu")


def test_the_http_row_sends_the_workload_through_lorakit_serve(tiny_model_dir):
    r = run_config("http", BenchServeConfig(model=str(tiny_model_dir), **SMALL))
    assert r["requests"] == 6 and r["failed"] == 0 and r["status_5xx"] == 0 and r["errors"] == []
    assert r["output_tokens"] == SMALL["requests"] * SMALL["new_tokens"]  # the same work as the engine's rows
    assert r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0 and 0 < r["ttft_s"]["p50"] <= r["ttft_s"]["p95"]
    assert "| http |" in serve_table({"http": r})


def test_the_load_run_reports_failures_and_server_memory(tiny_model_dir, tmp_path):
    cfg = BenchServeLoadConfig(model=str(tiny_model_dir), clients=8, rounds=2, adapters=2, max_tokens=4)
    r = load_run(cfg, tmp_path)
    assert r["requests"] == 16 and r["failed"] == 0 and r["status_5xx"] == 0 and r["status_429"] == 0
    assert r["output_tokens"] == 16 * 4
    assert 0 < r["rss_before_bytes"] <= r["peak_rss_bytes"] and len(r["rss_after_rounds_bytes"]) == 2
