"""The configurations of `lorakit bench serve`, each run in its own process by `bench_serve.run_config`.

Every function takes (kind, cfg, device, scratch directory, adapter count) and returns its measurements.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from lorakit.tools.bench import peak_memory, reset_peak_memory
from lorakit.tools.serve_workload import (
    BenchServeConfig,
    latency_summary,
    make_workload,
    serve_closed_loop,
    serve_one_adapter_at_a_time,
    summarize_handles,
    write_adapters,
)


def _engine_config(cfg: BenchServeConfig, rows: int, seq_len: int, adapters: int):
    from lorakit.serve import EngineConfig

    return EngineConfig(max_batch_size=rows, max_seq_len=seq_len, max_loaded_adapters=max(adapters, 1),
                        lora_strategy=cfg.lora_strategy, prefill=cfg.prefill,
                        lora_dtype=cfg.lora_dtype, weight_layout=cfg.weight_layout,
                        decode_step=cfg.decode_step)


def _load(cfg: BenchServeConfig, device: torch.device):
    from lorakit.training.models import compute_dtype, load_model

    loaded = load_model(cfg.model, device=device, fast_cpu_attention=False)
    loaded.model.to(compute_dtype(cfg.precision, device))
    return loaded


def run_engine(kind: str, cfg: BenchServeConfig, device: torch.device, tmp: Path, n_adapters: int) -> dict:
    """base / mixed / swap / swap-grouped: the workload through the engine, `concurrency` requests in flight."""
    from lorakit.serve import Engine, Request, SamplingParams

    loaded = _load(cfg, device)
    engine = Engine(loaded.model, loaded.tokenizer,
                    _engine_config(cfg, cfg.concurrency, cfg.max_prompt_tokens + cfg.new_tokens, n_adapters))
    workload = make_workload(cfg, engine.tokenizer, n_adapters)
    if kind != "base":
        for k, path in enumerate(write_adapters(engine.model, tmp, cfg, n_adapters)):
            engine.load_adapter(f"adapter{k}", path)
    params = SamplingParams(max_tokens=cfg.new_tokens, ignore_eos=True)
    requests = [Request(p, adapter=None if kind == "base" else f"adapter{a}", params=params)
                for p, a in zip(workload.prompts, workload.adapter_of)]
    warm = [Request(r.prompt, adapter=r.adapter, params=SamplingParams(max_tokens=4, ignore_eos=True))
            for r in requests[:cfg.concurrency]]
    serve_closed_loop(engine, warm, cfg.concurrency)
    reset_peak_memory(device)
    start = time.perf_counter()
    waited = None
    if kind == "swap":  # the same clients; only one adapter's requests run at a time
        handles, waited = serve_one_adapter_at_a_time(engine, requests, cfg.concurrency)
    elif kind == "swap-grouped":  # the whole workload known in advance, served one adapter's group after another
        handles = []
        for k in range(n_adapters):
            group = [r for r, a in zip(requests, workload.adapter_of) if a == k]
            handles += serve_closed_loop(engine, group, cfg.concurrency)
    else:
        handles = serve_closed_loop(engine, requests, cfg.concurrency)
    result = summarize_handles(handles, time.perf_counter() - start, waited)
    return {**result, "peak_mem_bytes": peak_memory(device), "adapters": 0 if kind == "base" else n_adapters,
            "weight_layout": engine.runner.weight_layout, "lora_strategy": engine.lora_strategy,
            "decode_step": engine.decode_step}


class _FirstTokenClock:
    """A transformers streamer that notes when generate produced its first new token (the 2nd put)."""

    def __init__(self) -> None:
        self.puts, self.first = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def run_peft(kind: str, cfg: BenchServeConfig, device: torch.device, tmp: Path, n_adapters: int) -> dict:
    """PEFT's mixed batches: generate(..., adapter_names=[...]) on static batches of `concurrency` requests."""
    from peft import PeftModel

    loaded = _load(cfg, device)
    tok = loaded.tokenizer
    paths = write_adapters(loaded.model, tmp, cfg, n_adapters)
    model = PeftModel.from_pretrained(loaded.model, paths[0], adapter_name="adapter0")
    for k, path in enumerate(paths[1:], start=1):
        model.load_adapter(path, adapter_name=f"adapter{k}")
    model.eval()
    workload = make_workload(cfg, tok, n_adapters)
    batches = [range(i, min(i + cfg.concurrency, cfg.requests)) for i in range(0, cfg.requests, cfg.concurrency)]

    def generate(batch, new_tokens):
        width = max(len(workload.prompts[i]) for i in batch)  # left padding, as batched generation needs
        ids = torch.tensor([[tok.pad_token_id] * (width - len(workload.prompts[i])) + workload.prompts[i] for i in batch])
        mask = torch.tensor([[0] * (width - len(workload.prompts[i])) + [1] * len(workload.prompts[i]) for i in batch])
        clock = _FirstTokenClock()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id, streamer=clock,
                           adapter_names=[f"adapter{workload.adapter_of[i]}" for i in batch])
        return start, clock.first, time.perf_counter()

    generate(batches[0], 4)  # warm-up
    reset_peak_memory(device)
    ttfts, tpots, begin = [], [], time.perf_counter()
    for batch in batches:
        start, first, end = generate(batch, cfg.new_tokens)
        ttfts += [first - start] * len(batch)
        tpots += [(end - first) / max(cfg.new_tokens - 1, 1)] * len(batch)
    result = latency_summary(ttfts, tpots, cfg.new_tokens * cfg.requests, time.perf_counter() - begin)
    return {**result, "peak_mem_bytes": peak_memory(device), "adapters": n_adapters}


def _decode_prompt(cfg: BenchServeConfig, tokenizer) -> list[int]:
    return make_workload(cfg, tokenizer, 1).prompts[0][:cfg.min_prompt_tokens]


def run_decode(kind: str, cfg: BenchServeConfig, device: torch.device, tmp: Path, n_adapters: int) -> dict:
    """Batch-1 decoding in the engine: the base, one unmerged adapter, or that adapter merged into the weights."""
    from lorakit.core.adapters import merge_and_unload
    from lorakit.core.io import load_adapter
    from lorakit.serve import Engine, Request, SamplingParams

    loaded = _load(cfg, device)
    model, adapter = loaded.model, None
    path = write_adapters(model, tmp, cfg, 1)[0]
    if kind == "decode-merged":
        model = merge_and_unload(load_adapter(model, path))
    prompt = _decode_prompt(cfg, loaded.tokenizer)
    engine = Engine(model, loaded.tokenizer, _engine_config(cfg, 1, len(prompt) + cfg.decode_tokens, 1))
    if kind == "decode-unmerged":
        engine.load_adapter("adapter0", path)
        adapter = "adapter0"
    best = 0.0
    for round_ in range(4):  # round 0 warms up; the best of the other three is kept
        n = cfg.decode_tokens if round_ else max(cfg.decode_tokens // 4, 2)
        c = engine.generate([Request(prompt, adapter=adapter, params=SamplingParams(max_tokens=n, ignore_eos=True))])[0]
        if round_:
            best = max(best, (c.completion_tokens - 1) / (c.total_s - c.ttft_s))
    notes = {"decode-base": "the engine, no adapter", "decode-unmerged": f"the engine, one r={cfg.r} adapter unmerged",
             "decode-merged": "the engine, that adapter merged into the weights"}
    strategy = f"; LoRA {engine.lora_strategy}" if kind == "decode-unmerged" else ""
    return {"tokens_per_s": best, "note": f"{notes[kind]}; weights {engine.runner.weight_layout}{strategy}; "
                                          f"steps {engine.decode_step}",
            "weight_layout": engine.runner.weight_layout, "lora_strategy": engine.lora_strategy,
            "decode_step": engine.decode_step}


def run_generate_decode(kind: str, cfg: BenchServeConfig, device: torch.device, tmp: Path, n_adapters: int) -> dict:
    """Batch-1 decoding through transformers' generate on the base (its default attention)."""
    loaded = _load(cfg, device)
    prompt = torch.tensor([_decode_prompt(cfg, loaded.tokenizer)], device=device)
    best = 0.0
    for round_ in range(4):
        n = cfg.decode_tokens if round_ else max(cfg.decode_tokens // 4, 2)
        clock = _FirstTokenClock()
        with torch.no_grad():
            loaded.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id,
                                  streamer=clock)
        if round_:
            best = max(best, (n - 1) / (time.perf_counter() - clock.first))
    return {"tokens_per_s": best, "note": "transformers' generate on the base"}


def run_bandwidth(kind: str, cfg: BenchServeConfig, device: torch.device, tmp: Path, n_adapters: int) -> dict:
    """The batch-1 limit: a decoding step reads every weight once, so tokens/s <= bandwidth / weight bytes."""
    model = _load(cfg, device).model
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    weight_bytes = sum(storages.values())  # tied weights counted once
    x = torch.ones(128 * 1024 * 1024, dtype=torch.float32, device=device)  # 512 MiB, far beyond any cache
    best = float("inf")
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        x.sum()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    bandwidth = x.numel() * x.element_size() / best
    return {"tokens_per_s": bandwidth / weight_bytes, "weight_bytes": weight_bytes, "bandwidth_bytes_per_s": bandwidth,
            "note": f"{weight_bytes / 1e6:.0f} MB of weights / {bandwidth / 1e9:.1f} GB/s measured (a 512 MiB sum)"}


def run_llama_cpp(kind: str, cfg: BenchServeConfig, device: torch.device, tmp: Path, n_adapters: int) -> dict:
    """llama.cpp's single-stream decoding of the GGUF file (the default model's own Q4_1 file)."""
    try:
        import llama_cpp
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install llama-cpp-python)"}
    from lorakit.training.models import default_gguf_path, load_model

    if cfg.model in (None, "default"):
        path = default_gguf_path()
    elif str(cfg.model).endswith(".gguf"):
        path = Path(cfg.model)
    else:
        return {"skipped": "llama.cpp reads GGUF files; --model is a Hugging Face directory"}
    text = load_model(cfg.model, device="cpu").tokenizer.decode(_decode_prompt(cfg, load_model(cfg.model).tokenizer))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=cfg.min_prompt_tokens + cfg.decode_tokens + 64,
                          n_threads=os.cpu_count(), verbose=False, seed=cfg.seed)
    best = 0.0
    for round_ in range(4):
        n = cfg.decode_tokens if round_ else max(cfg.decode_tokens // 4, 2)
        times = [time.perf_counter() for _ in llm.create_completion(
            text, max_tokens=n, temperature=0.0, stream=True, logit_bias={llm.token_eos(): -1e9})]
        if round_ and len(times) > 1:
            best = max(best, (len(times) - 1) / (times[-1] - times[0]))
    return {"tokens_per_s": best, "note": f"llama-cpp-python {llama_cpp.__version__}, {path.name}, "
                                          f"{os.cpu_count()} threads"}


def run_agreement(kind: str, cfg: BenchServeConfig, device: torch.device, tmp: Path, n_adapters: int) -> dict:
    """Greedy tokens of requests served in one mixed batch vs each alone with model.generate (same dtype)."""
    from lorakit.core.active import set_adapter
    from lorakit.core.io import load_adapter
    from lorakit.serve import Engine, Request, SamplingParams

    loaded, reference = _load(cfg, device), _load(cfg, device).model
    engine = Engine(loaded.model, loaded.tokenizer,
                    _engine_config(cfg, cfg.concurrency, cfg.max_prompt_tokens + cfg.new_tokens, n_adapters))
    paths = write_adapters(reference, tmp, cfg, n_adapters)
    for k, path in enumerate(paths):
        engine.load_adapter(f"adapter{k}", path)
        load_adapter(reference, path, adapter_name=f"adapter{k}")
    workload = make_workload(cfg, loaded.tokenizer, n_adapters)
    m = min(cfg.agreement_requests, cfg.requests)
    params = SamplingParams(max_tokens=cfg.new_tokens, ignore_eos=True)
    served = engine.generate([Request(p, adapter=f"adapter{a}", params=params)
                              for p, a in zip(workload.prompts[:m], workload.adapter_of[:m])])
    reference.generation_config.eos_token_id = None
    identical, matching = 0, 0.0
    for prompt, a, completion in zip(workload.prompts[:m], workload.adapter_of[:m], served):
        set_adapter(reference, f"adapter{a}")
        ids = torch.tensor([prompt], device=device)
        with torch.no_grad():
            expected = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=cfg.new_tokens, pad_token_id=0)[0, len(prompt):].tolist()
        same = next((i for i, (x, y) in enumerate(zip(expected, completion.token_ids)) if x != y), len(expected))
        identical += same == len(expected)
        matching += same / len(expected)
    return {"requests": m, "identical_requests": identical, "matching_token_fraction": matching / m,
            "dtype": str(loaded.model.dtype).removeprefix("torch.")}
