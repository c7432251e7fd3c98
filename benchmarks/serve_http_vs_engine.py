"""HTTP vs the engine on its own thread, on one model, in one process: the same 16 requests (40-token
prompts, 16 tokens each, all submitted at once) through `engine.submit` and through `lorakit serve`'s app
(16 streaming clients on loopback), twice, alternating.

    python benchmarks/serve_http_vs_engine.py default
"""
import asyncio, time, sys
from lorakit.serve import Engine, EngineConfig, Request, SamplingParams
from lorakit.serve.http.config import ServeConfig
from lorakit.serve.http.server import BackgroundServer, build_app
from lorakit.tools.bench_serve_http import closed_loop, summarize
model = sys.argv[1]; N, T, C = 16, 16, 8
e = Engine.from_pretrained(model, EngineConfig(max_batch_size=C, max_seq_len=128)).start()
prompts = [list(range(1000 + 7 * k, 1040 + 7 * k)) for k in range(N)]
def engine_run():
    t = time.perf_counter(); hs = [e.submit(Request(p, params=SamplingParams(max_tokens=T, ignore_eos=True))) for p in prompts]
    [h.result() for h in hs]; return N * T / (time.perf_counter() - t)
engine_run()  # warm
with BackgroundServer(build_app(e, ServeConfig(), base_name="base")) as s:
    bodies = [{"model": "base", "prompt": p, "max_tokens": T, "temperature": 0, "stream": True, "ignore_eos": True,
               "stream_options": {"include_usage": True}} for p in prompts]
    for _ in range(2):
        a = engine_run()
        t = time.perf_counter(); r = asyncio.run(closed_loop(s.url, bodies, N)); h = summarize(r, time.perf_counter() - t)
        print(f"engine thread {a:.1f} tok/s   http {h['tokens_per_s']:.1f} tok/s   ratio {h['tokens_per_s'] / a:.2f}   failed {h['failed']}", flush=True)
e.stop()
