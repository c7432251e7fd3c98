"""`lorakit bench train|infer`: how fast and how lean a LoRA step is, beside what users would otherwise run.

Each configuration runs in a fresh subprocess so that its peak memory is its own:
    floor   forward + backward of the frozen base, no adapter, input gradients only, fastest dtype
    lorakit a full LoRA training step exactly as `lorakit train` runs it
    peft    the same step with Hugging Face PEFT as its users run it (get_peft_model + torch.autocast)
    full    full fine-tuning of every parameter with AdamW under autocast
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from lorakit.core.errors import LorakitError

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class BenchModelOptions:
    """What every bench adapts: the model, and LoRA's rank and targets on it."""

    model: str | None = None
    """Model: 'default' (embedded SmolLM2-135M-Instruct), a .gguf file, or a Hugging Face model directory."""
    r: int = 8
    """LoRA rank."""
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEARS))
    """Adapted modules (comma-separated)."""
    device: str | None = None
    """cpu, cuda ...; default: cuda if available."""
    json: bool = False
    """Print a JSON object instead of a table."""


@dataclass
class BenchTrainConfig(BenchModelOptions):
    batch_size: int = 4
    """Sequences per step."""
    seq_len: int = 256
    """Tokens per sequence."""
    steps: int = 8
    """Timed steps (after --warmup); step_s is their median."""
    warmup: int = 2
    """Untimed steps first."""
    configs: list[str] = field(default_factory=lambda: ["limit", "floor", "lorakit", "peft", "full"])
    """Configurations to run: limit (the lorakit step's matrix products replayed alone), floor, lorakit, peft, full."""
    rounds: int = 1
    """Runs of each configuration, interleaved; the table keeps each one's median run (and largest peak memory)."""
    method: Literal["lora", "dora"] = "lora"
    """Adapter method of the lorakit and peft configurations: lora, or dora (PEFT's use_dora=True)."""
    quantize: Literal["none", "nf4", "int8"] = "none"
    """QLoRA: the lorakit configuration's frozen base in 4-bit NF4 or int8 (bitsandbytes)."""
    compile: Literal["auto", "on", "off"] = "auto"
    """The lorakit configuration's decoder layers compiled as `lorakit train --compile` decides (auto: where
    measured faster on this machine, once, cached)."""
    profile: bool = False
    """After timing, profile 3 more steps of each configuration (torch.profiler) and print where the time goes,
    by operator category."""


@dataclass
class BenchInferConfig(BenchModelOptions):
    new_tokens: int = 128
    """Tokens generated per run."""
    repeats: int = 5
    """Timed rounds, every model once per round (each model's best round is kept)."""
    peft: bool = True
    """Also time PEFT's unmerged adapter (for scale)."""


# ---- one configuration, in its own process ----------------------------------------------------------
def peak_memory(device: torch.device) -> int:
    """The process's peak memory in bytes: max allocated on a GPU, the resident set's high-water mark on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_memory(device: torch.device) -> bool:
    """Restart the peak from the current usage, so that it covers the steps and not the model's loading."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets the RSS high-water mark (ru_maxrss)
            f.write("5")
        return True
    except OSError:
        return False


def _batch(cfg: BenchTrainConfig, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _run_config(cfg: BenchTrainConfig):
    """The `lorakit train` options of the benchmarked adapter: --method at rank r, lora_alpha 2r, the targets."""
    from lorakit.methods.lora import LoraOptions
    from lorakit.training.config import TrainConfig

    return TrainConfig(method=cfg.method, lr=1e-4, compile=cfg.compile,
                       lora=LoraOptions(r=cfg.r, lora_alpha=2 * cfg.r, target_modules=list(cfg.target_modules)))


def _lorakit_step(cfg: BenchTrainConfig, model: torch.nn.Module, batch: dict, dtype: torch.dtype):
    """One training step of `model` exactly as `lorakit train` runs it (methods, optimizer groups, loss)."""
    from lorakit.core.quantize import quantize_model
    from lorakit.methods.combine import apply_methods
    from lorakit.methods.registry import make_methods
    from lorakit.training.compiled_layers import MIN_STEPS, compile_layers, should_compile
    from lorakit.training.loop import make_optimizer
    from lorakit.training.loss import loss_sum

    model.to(dtype)  # as lorakit train: the frozen base in the compute dtype, LoRA in fp32
    quantize_model(model, cfg.quantize, dtype)
    run = _run_config(cfg)
    methods = make_methods(run)
    apply_methods(methods, model, cfg.model or "default")
    model.train()
    # as lorakit train decides it for a long run on one process
    if should_compile(run.compile, model, device=batch["input_ids"].device, steps=MIN_STEPS,
                      tokens=min(cfg.seq_len, 256), dtype=dtype, single_process=True,
                      plain_layers=cfg.quantize == "none"):
        compile_layers(model)
    opt = make_optimizer(model, run, methods)

    def step():
        total, n = loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        (total / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def step_function(name: str, cfg: BenchTrainConfig, device: torch.device):
    """Build configuration `name`; return a function that runs one training step, and the model it trains."""
    from lorakit.methods.registry import make_methods
    from lorakit.training.models import default_dtype, load_model

    dtype = default_dtype(device)
    # floor and lorakit hold the frozen base in the compute dtype; peft and full keep fp32 weights, as
    # their users run them under autocast
    load_dtype = dtype if name in ("floor", "lorakit") else torch.float32
    # lorakit's CPU attention for floor and lorakit (as `lorakit train` loads the model); stock "sdpa" for
    # peft and full, as their users run them
    model = load_model(cfg.model, device=device, dtype=load_dtype,
                       fast_cpu_attention=name in ("floor", "lorakit")).model
    batch = _batch(cfg, model.config.vocab_size, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    if name == "floor":
        model.to(dtype).requires_grad_(False)
        embed = model.get_input_embeddings()

        def step():
            # input gradients only: the backward pass runs through every layer, no weight gradient exists
            x = embed(batch["input_ids"]).detach().requires_grad_(True)
            hidden = model.base_model(inputs_embeds=x, attention_mask=batch["attention_mask"]).last_hidden_state
            logits = model.get_output_embeddings()(hidden[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"][:, 1:].flatten())
            loss.backward()
        return step, model

    if name == "lorakit":
        return _lorakit_step(cfg, model, batch, dtype), model

    if name == "peft":
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        ours = make_methods(_run_config(cfg))[0].config  # the same LoraConfig, e.g. use_dora for dora
        peft_model = get_peft_model(model, PeftLoraConfig(r=ours.r, lora_alpha=ours.lora_alpha, use_dora=ours.use_dora,
                                                          target_modules=ours.target_modules))
        peft_model.train()
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)

        return autocast_step(peft_model, batch, opt, autocast), peft_model

    if name == "full":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        return autocast_step(model, batch, opt, autocast), model
    raise LorakitError(f"unknown bench configuration {name!r}: use floor, lorakit, peft or full.")


def autocast_step(model, batch: dict, opt: torch.optim.Optimizer, autocast):
    """One step as PEFT's and full fine-tuning's users run it: the model's own loss under autocast."""
    def step():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def run_one(name: str, cfg: BenchTrainConfig) -> dict:
    """Time configuration `name` in this process.

    Returns:
        tokens_per_s, step_s (median over the timed steps), step_s_mean; peak_mem_bytes (the process's peak, loading included: RSS on CPU);
        step_peak_mem_bytes (the peak over the steps alone, None where it cannot be reset); model_bytes
        (the model's own tensors: weights, quantization scales, adapters).
    """
    from lorakit.core.quantize import tensor_bytes
    from lorakit.training.models import as_device, default_device

    device = as_device(cfg.device) if cfg.device else default_device()
    torch.manual_seed(0)
    if name == "limit":
        return run_limit(cfg, device)
    step, model = step_function(name, cfg, device)
    setup_peak = peak_memory(device)
    step_peak_known = reset_peak_memory(device)
    for _ in range(cfg.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(cfg.steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)  # robust to the odd stall of a shared machine
    result = {"tokens_per_s": cfg.batch_size * cfg.seq_len / step_s, "step_s": step_s,
              "step_s_mean": statistics.fmean(times),
              "peak_mem_bytes": max(setup_peak, peak_memory(device)),
              "step_peak_mem_bytes": peak_memory(device) if step_peak_known else None,
              "model_bytes": tensor_bytes(model)}
    if cfg.profile:  # after the timed steps, so the profiler's overhead never reaches step_s
        from lorakit.tools.step_profile import profile_step

        result["profile"] = profile_step(step, steps=3)
    return result


def run_limit(cfg: BenchTrainConfig, device: torch.device) -> dict:
    """The roofline of lorakit's step: its matrix products (forward and backward, as dispatched after the
    warm-up steps, so in the dtypes and shapes the autotuned kernels chose) replayed back to back alone.

    Products inside fused kernels (sdpa's flash attention) are not recorded, so the limit is a lower bound.
    """
    from lorakit.core.quantize import tensor_bytes
    from lorakit.tools.roofline import capture_gemms, gemm_summary, replay_seconds

    # captured eager: compiling the layers fuses the work between the products, not the products themselves
    step, model = step_function("lorakit", dataclasses.replace(cfg, compile="off"), device)
    for _ in range(max(1, cfg.warmup)):
        step()
    calls = capture_gemms(step)
    step_s = replay_seconds(calls, device, repeats=max(3, cfg.steps))
    return {"tokens_per_s": cfg.batch_size * cfg.seq_len / step_s, "step_s": step_s, "step_s_mean": step_s,
            "peak_mem_bytes": peak_memory(device), "step_peak_mem_bytes": None, "model_bytes": tensor_bytes(model),
            "gemms": gemm_summary(calls)}


def run_in_subprocess(module: str, name: str, cfg, what: str) -> dict:
    """Run configuration `name` of a bench as `python -m module` in a fresh process (its memory its own).

    Args:
        module: the bench module whose `__main__` runs one configuration and prints its JSON result last.
        cfg: the bench's config dataclass, passed as JSON.
        what: how errors name the bench, e.g. "bench serve".

    Returns:
        The configuration's result.

    Raises:
        LorakitError: the process failed (its stderr's tail is in the message).
    """
    payload = json.dumps({"name": name, "config": asdict(cfg)})
    proc = subprocess.run([sys.executable, "-m", module, payload], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    if proc.returncode != 0:
        raise LorakitError(f"{what} configuration {name!r} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratios(results: dict[str, dict]) -> None:
    for name, r in results.items():
        for ref in ("limit", "floor", "peft", "full"):
            if ref in results and ref != name:
                r[f"tokens_per_s_vs_{ref}"] = r["tokens_per_s"] / results[ref]["tokens_per_s"]
                r[f"step_s_vs_{ref}"] = r["step_s"] / results[ref]["step_s"]
                if ref != "limit":  # the limit's memory is a process holding one model, not a training step
                    r[f"peak_mem_vs_{ref}"] = r["peak_mem_bytes"] / results[ref]["peak_mem_bytes"]


def train_table(results: dict[str, dict]) -> str:
    lines = ["| config | tokens/s | step (s) | step vs limit | peak memory (GB) | vs floor (tok/s) | vs peft (tok/s) "
             "| vs peft (memory) | model (GB) | steps peak (GB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        f = lambda key: f"{r[key]:.2f}x" if key in r else "-"  # noqa: E731
        steps_peak = f"{r['step_peak_mem_bytes'] / 1e9:.2f}" if r.get("step_peak_mem_bytes") else "-"
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {f('step_s_vs_limit')} "
                     f"| {r['peak_mem_bytes'] / 1e9:.2f} | "
                     f"{f('tokens_per_s_vs_floor')} | {f('tokens_per_s_vs_peft')} | {f('peak_mem_vs_peft')} "
                     f"| {r['model_bytes'] / 1e9:.3f} | {steps_peak} |")
    return "\n".join(lines)


def _median_run(runs: list[dict]) -> dict:
    """The run with the median step time (the lower one for an even count), its peak memory the largest seen."""
    chosen = dict(sorted(runs, key=lambda r: r["step_s"])[(len(runs) - 1) // 2])
    chosen["peak_mem_bytes"] = max(r["peak_mem_bytes"] for r in runs)
    chosen["step_s_rounds"] = [r["step_s"] for r in runs]
    return chosen


def bench_train(cfg: BenchTrainConfig) -> dict:
    """Run every configuration in its own subprocess, --rounds times interleaved; print the table (or JSON)."""
    if cfg.rounds < 1:
        raise LorakitError(f"--rounds must be at least 1, got {cfg.rounds}.")
    runs: dict[str, list[dict]] = {name: [] for name in cfg.configs}
    for _ in range(cfg.rounds):  # floor, lorakit, peft, full, floor, ...: a drift in speed hits all alike
        for name in cfg.configs:
            runs[name].append(run_in_subprocess("lorakit.tools.bench", name, cfg, "bench"))
    results = {name: _median_run(r) for name, r in runs.items()}
    _ratios(results)
    out = {"model": cfg.model or "default", "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "r": cfg.r,
           "quantize": cfg.quantize, "method": cfg.method, "rounds": cfg.rounds, "torch": torch.__version__,
           "configs": results}
    from lorakit.core import autotune

    out["machine"] = autotune.machine_key()
    out["kernels"] = {entry: d.get("choice") for entry, d in autotune.decisions().items()}
    print(json.dumps(out, indent=2) if cfg.json else train_table(results) + "\n\n" + kernel_lines(out)
          + profile_lines(results))
    return out


def profile_lines(results: dict[str, dict]) -> str:
    """With --profile: where each configuration's step time goes, by operator category."""
    from lorakit.tools.step_profile import breakdown_table

    profiles = {name: r["profile"] for name, r in results.items() if "profile" in r}
    if not profiles:
        return ""
    return ("\n\nwhere the time goes (torch.profiler self time per step, seconds and share; the profiler's "
            "overhead included):\n" + breakdown_table(profiles))


def kernel_lines(out: dict) -> str:
    """Where the bench ran and the kernels autotune chose there (the subprocesses measured and cached them)."""
    chosen = [f"  {entry}: {choice}" for entry, choice in out["kernels"].items()] or ["  (none measured)"]
    return "\n".join([f"machine: {out['machine']}", "kernels chosen on it:", *chosen])


# ---- inference ---------------------------------------------------------------------------------------
def bench_infer(cfg: BenchInferConfig) -> dict:
    """Generation tokens/s of the base, base + adapter (unmerged) and merged, same prompt and length, and
    the limit: the base's weight bytes over the measured memory bandwidth (decoding is memory-bound).

    "merged" is what `lorakit merge` exports: merge_and_unload, the base's own modules with W + s B A.
    The models are held side by side and timed in turn, round after round (the best round of each is
    kept), so a drift in the machine's speed hits them all alike.
    """
    import copy

    from lorakit.core.adapters import merge_and_unload
    from lorakit.core.config import LoraConfig
    from lorakit.core.inject import apply
    from lorakit.training.models import as_device, default_device, default_dtype, load_model

    device = as_device(cfg.device) if cfg.device else default_device()
    loaded = load_model(cfg.model, device=device)
    base, tok = loaded.model.to(default_dtype(device)), loaded.tokenizer
    ids = tok("The history of the printing press", return_tensors="pt").to(device)
    adapter = LoraConfig(r=cfg.r, target_modules=list(cfg.target_modules), init_lora_weights=False)  # B != 0
    unmerged = apply(copy.deepcopy(base), adapter).eval()
    # "base (copy)", a second copy of the base, shows how far two identical models differ on this machine
    models = {"base": base, "base (copy)": copy.deepcopy(base), "unmerged": unmerged,
              "merged": merge_and_unload(copy.deepcopy(unmerged))}
    if cfg.peft:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        peft_base = load_model(cfg.model, device=device, fast_cpu_attention=False).model.to(default_dtype(device))
        models["peft unmerged"] = get_peft_model(peft_base, PeftLoraConfig(
            r=cfg.r, target_modules=list(cfg.target_modules), init_lora_weights=False)).eval()

    best = {name: float("inf") for name in models}
    with torch.no_grad():
        for round_ in range(cfg.repeats + 1):  # round 0 warms up
            for name, model in models.items():
                start = time.perf_counter()
                model.generate(**ids, max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens,
                               do_sample=False, pad_token_id=tok.pad_token_id)
                if round_:
                    best[name] = min(best[name], time.perf_counter() - start)
    results = {name: cfg.new_tokens / seconds for name, seconds in best.items()}
    # decoding reads every weight once per token: the base's bytes over the measured bandwidth bound it
    from lorakit.core.quantize import tensor_bytes
    from lorakit.tools.roofline import decode_limit_tokens_per_s, memory_bandwidth

    results["limit (bandwidth)"] = decode_limit_tokens_per_s(tensor_bytes(base), memory_bandwidth(device))
    out = {"tokens_per_s": results, "base_vs_limit": results["base"] / results["limit (bandwidth)"], "unmerged_vs_base": results["unmerged"] / results["base"],
           "merged_vs_base": results["merged"] / results["base"], "new_tokens": cfg.new_tokens,
           "model": cfg.model or "default", "r": cfg.r}
    if cfg.json:
        print(json.dumps(out, indent=2))
    else:
        print("| model | tokens/s | vs base |\n|---|---|---|")
        for name, value in results.items():
            print(f"| {name} | {value:.1f} | {value / results['base']:.3f}x |")
    return out


if __name__ == "__main__":  # the per-configuration subprocess
    request = json.loads(sys.argv[1])
    print(json.dumps(run_one(request["name"], BenchTrainConfig(**request["config"]))))
