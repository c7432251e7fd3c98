"""`lorakit serve` measured over HTTP on loopback, the server in its own process (`lorakit serve` itself):

    bench serve --http   the engine bench's workload sent by `concurrency` streaming clients (closed loop)
                         to /v1/completions: output tokens/s beside the engine's own (the mixed row), and
                         time to first token as a client sees it (first streamed chunk)
    bench serve-load     many concurrent streaming clients over several adapters on a tiny model for a
                         bounded run: failed requests, 5xx count, 429s, the server's peak and settled RSS
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lorakit.core.errors import LorakitError
from lorakit.tools.serve_workload import BenchServeConfig, latency_summary, make_workload, write_adapters


class ServerProcess:
    """`lorakit serve ARGS` in a child process on a free loopback port; SIGTERM on exit."""

    def __init__(self, args: list[str]) -> None:
        code = "import sys; from lorakit.cli.main import main; sys.exit(main())"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        self.proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--port", "0", *args], env=env,
                                     stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self.url = None
        for line in self.proc.stderr:
            self.log.append(line)
            match = re.search(r"listening on (http://\S+?)[;\s]", line)
            if match:
                self.url = match.group(1)
                break
        if self.url is None:
            self.proc.wait()
            raise LorakitError("lorakit serve did not start:\n" + "".join(self.log[-20:]))
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()

    def memory(self) -> dict[str, int]:
        """The server's resident set now (rss) and its high-water mark (peak), in bytes."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields["rss" if key == "VmRSS" else "peak"] = int(value.split()[0]) * 1024
        return fields

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def stream_one(client, url: str, body: dict) -> dict:
    """One streamed completion: status, time to first chunk, completion tokens (usage), whether it ended with [DONE]."""
    start = time.perf_counter()
    out = {"status": None, "ttft_s": None, "tokens": 0, "done": False, "total_s": None}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            out["status"] = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out["done"] = True
                    continue
                chunk = json.loads(line[6:])
                if out["ttft_s"] is None and chunk.get("choices"):
                    out["ttft_s"] = time.perf_counter() - start
                if chunk.get("usage"):
                    out["tokens"] = chunk["usage"]["completion_tokens"]
    except Exception as e:  # a transport failure counts as a failed request, with its reason
        out["error"] = f"{type(e).__name__}: {e}"
    out["total_s"] = time.perf_counter() - start
    return out


async def closed_loop(url: str, bodies: list[dict], concurrency: int) -> list[dict]:
    """Keep `concurrency` streamed requests in flight until all `bodies` are answered (in order of sending)."""
    import httpx2 as httpx

    pending = list(reversed(bodies))
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker():
            while pending:
                results.append(await stream_one(client, url, pending.pop()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def summarize(results: list[dict], seconds: float) -> dict:
    ok = [r for r in results if r["status"] == 200 and r["done"]]
    tpots = [(r["total_s"] - r["ttft_s"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1 and r["ttft_s"]]
    summary = latency_summary([r["ttft_s"] for r in ok if r["ttft_s"] is not None], tpots,
                              sum(r["tokens"] for r in ok), seconds)
    return {**summary, "requests": len(results), "failed": len(results) - len(ok),
            "status_5xx": sum(1 for r in results if (r["status"] or 0) >= 500),
            "status_429": sum(1 for r in results if r["status"] == 429),
            "errors": sorted({r["error"] for r in results if "error" in r})[:5]}


def run_http(kind: str, cfg: BenchServeConfig, device, tmp: Path, n_adapters: int) -> dict:
    """The workload of the mixed row, over HTTP: `lorakit serve` in a child process, streaming clients here."""
    from lorakit.training.models import load_model

    loaded = load_model(cfg.model, device="cpu", fast_cpu_attention=False)
    workload = make_workload(cfg, loaded.tokenizer, n_adapters)
    paths = write_adapters(loaded.model, tmp, cfg, n_adapters)
    del loaded
    adapters = ",".join(f"adapter{k}={p}" for k, p in enumerate(paths))
    args = ["--model", cfg.model or "default", "--adapter", adapters, "--max-batch-size", str(cfg.concurrency),
            "--max-seq-len", str(cfg.max_prompt_tokens + cfg.new_tokens), "--max-loaded-adapters", str(n_adapters),
            "--max-concurrency", str(4 * cfg.concurrency), "--precision", cfg.precision,
            "--served-model-name", "base"]
    if cfg.device:
        args += ["--device", cfg.device]
    bodies = [{"model": f"adapter{a}", "prompt": p, "max_tokens": cfg.new_tokens, "temperature": 0, "stream": True,
               "ignore_eos": True, "stream_options": {"include_usage": True}}
              for p, a in zip(workload.prompts, workload.adapter_of)]
    with ServerProcess(args) as server:
        warm = [{**b, "max_tokens": 4} for b in bodies[:cfg.concurrency]]
        asyncio.run(closed_loop(server.url, warm, cfg.concurrency))
        start = time.perf_counter()
        results = asyncio.run(closed_loop(server.url, bodies, cfg.concurrency))
        summary = summarize(results, time.perf_counter() - start)
        memory = server.memory()
    return {**summary, "peak_mem_bytes": memory["peak"], "adapters": n_adapters}


# ---- bench serve-load --------------------------------------------------------------------------------------
@dataclass
class BenchServeLoadConfig:
    clients: int = 200
    """Concurrent streaming clients."""
    rounds: int = 3
    """Bursts of `clients` concurrent requests, one after the other (the server's RSS is read after each)."""
    model: str | None = None
    """Model served (default: a tiny random 2-layer Llama with SmolLM2's tokenizer, built in a scratch directory)."""
    adapters: int = 8
    """Adapters the requests are spread over (rank 8, all projections)."""
    max_tokens: int = 32
    """Tokens generated per request (stop tokens ignored)."""
    json: bool = False
    """Print a JSON object instead of lines of text."""
    max_batch_size: int = 32
    """The server's batch rows (the rest queue in the engine)."""
    seed: int = 0
    """Seed of the prompts and adapters."""


def tiny_model(directory: Path, hidden_size: int = 64, heads: int = 4, kv_heads: int = 2,
               max_positions: int = 512) -> str:
    """A random 2-layer Llama (seed 0) with the default model's tokenizer, saved in `directory` (benchmarks
    that must not wait on the real model use it too)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorakit.training.models import default_gguf_path

    gguf = default_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def load_run(cfg: BenchServeLoadConfig, tmp: Path) -> dict:
    from lorakit.training.models import load_model

    model = cfg.model or tiny_model(tmp / "tiny")
    loaded = load_model(model, device="cpu", fast_cpu_attention=False)
    workload_cfg = BenchServeConfig(requests=cfg.clients * cfg.rounds, min_prompt_tokens=8,
                                    max_prompt_tokens=64, adapters=cfg.adapters, seed=cfg.seed)
    workload = make_workload(workload_cfg, loaded.tokenizer, cfg.adapters)
    paths = write_adapters(loaded.model, tmp, workload_cfg, cfg.adapters)
    del loaded
    args = ["--model", model, "--adapter", ",".join(f"adapter{k}={p}" for k, p in enumerate(paths)),
            "--max-batch-size", str(cfg.max_batch_size), "--max-seq-len", str(64 + cfg.max_tokens),
            "--max-loaded-adapters", str(cfg.adapters), "--max-concurrency", str(cfg.clients),
            "--precision", "fp32", "--device", "cpu"]
    bodies = [{"model": f"adapter{a}", "prompt": p, "max_tokens": cfg.max_tokens, "temperature": 0.7, "seed": k,
               "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
              for k, (p, a) in enumerate(zip(workload.prompts, workload.adapter_of))]
    results, rss = [], []
    with ServerProcess(args) as server:
        asyncio.run(closed_loop(server.url, bodies[:4], 4))  # warm
        before = server.memory()["rss"]
        start = time.perf_counter()
        for k in range(cfg.rounds):  # a burst of `clients` at once, then the next when all have finished
            results += asyncio.run(closed_loop(server.url, bodies[k * cfg.clients:(k + 1) * cfg.clients], cfg.clients))
            rss.append(server.memory()["rss"])
        summary = summarize(results, time.perf_counter() - start)
        memory = server.memory()
    return {**summary, "clients": cfg.clients, "adapters": cfg.adapters, "rss_before_bytes": before,
            "rss_after_rounds_bytes": rss, "rss_after_bytes": memory["rss"], "peak_rss_bytes": memory["peak"]}


def bench_serve_load(cfg: BenchServeLoadConfig) -> dict:
    """`lorakit bench serve-load`: print failed requests, 5xx, 429s, throughput, TTFT and the server's memory."""
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-load-") as tmp:
        out = load_run(cfg, Path(tmp))
    if cfg.json:
        print(json.dumps(out, indent=2))
        return out
    ms = lambda key, q: "-" if out[key][q] is None else f"{out[key][q] * 1000:.0f}"
    print(f"{out['requests']} streamed requests in {cfg.rounds} bursts of {cfg.clients} concurrent clients over {cfg.adapters} adapters "
          f"({cfg.max_tokens} tokens each) in {out['seconds']:.1f} s")
    print(f"failed: {out['failed']}   5xx: {out['status_5xx']}   429: {out['status_429']}   "
          f"output tokens/s: {out['tokens_per_s']:.0f}   TTFT p50/p95: {ms('ttft_s', 'p50')}/{ms('ttft_s', 'p95')} ms")
    rounds = ", ".join(f"{b / 2**20:.0f}" for b in out["rss_after_rounds_bytes"])
    print(f"server RSS: {out['rss_before_bytes'] / 2**20:.0f} MiB before, {rounds} MiB after each burst, "
          f"peak {out['peak_rss_bytes'] / 2**20:.0f} MiB")
    for error in out["errors"]:
        print(f"error: {error}")
    return out
