"""The generation engine: one base model, many adapters, one batch, continuous batching.

    engine = Engine.from_pretrained("default", EngineConfig(max_batch_size=16))
    engine.load_adapter("orders", "runs/demo/adapter")
    handle = engine.submit(Request([{"role": "user", "content": "..."}], adapter="orders"))
    for delta in handle:              # streams; runs the engine's steps itself unless engine.start() was called
        print(delta.text, end="")
    handle.result().finish_reason     # "stop" or "length"

Each `step` admits queued requests into free batch rows (their prompts are prefilled in the same forward as
the running rows' next tokens, or in a forward of their own: `EngineConfig.prefill`), samples one token
for every row, streams it, and retires the rows that finished, so requests join and leave between steps.
Rows on adapters are kept before rows on the base in the cache, so the LoRA branch (`multi_lora`) covers
a leading block of rows and the base rows skip it. Nothing here knows about HTTP.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lorakit.core.errors import LorakitError
from lorakit.serve.adapters import AdapterStore, AdapterWeights, read_adapter
from lorakit.serve.decode_step import STEP_CHOICES
from lorakit.serve.detokenize import IncrementalText
from lorakit.serve.kv_cache import layout_moves
from lorakit.serve.llama import GROUPS, LlamaRunner
from lorakit.serve.lora_kernel import pick as pick_lora_kernel, segments_kernel
from lorakit.serve.multi_lora import DecodePlan, FusedPlan, GatherPlan, LoraBatch, OneAdapterPlan, RowFactors, SegmentPlan
from lorakit.serve.prompts import prompt_ids
from lorakit.serve.requests import (
    Completion,
    Delta,
    Request,
    RequestHandle,
    SamplingParams,
)
from lorakit.serve.sampling import make_generator, sample
from lorakit.serve.step_batch import StepBatch
from lorakit.serve.weights import LAYOUTS
from lorakit.training.generation import stop_token_ids


@dataclass
class EngineConfig:
    """How much the engine holds at once, and how it batches.

    Args:
        max_batch_size: requests decoded together (batch rows); more wait in the queue.
        max_seq_len: prompt + generated tokens of one request (the KV cache's length per row).
        max_loaded_adapters: adapters held in memory; the least recently used unused one is dropped
            when another must load, and read again when a request needs it.
        max_prefill_tokens: prompt tokens admitted per step (one longer prompt is still admitted alone).
        max_queued: requests waiting beyond the batch; `submit` refuses more (None: no limit).
        lora_strategy: the per-row LoRA branch of decoding rows: "fused" (one compiled call per group, each
            row reading its adapter's factors, and new prompts' tokens likewise; on the CPU, built once per
            machine), "gather" (per-row copies
            of the factors, batched matmuls), "segment" (rows grouped by adapter, GEMMs per group) or "auto"
            (fused where it applies and builds, else gather); see lorakit.serve.multi_lora.
        prefill: "with_decode" (new prompts ride in the running rows' decoding step) or "separate" (a
            forward of their own first).
        lora_dtype: the dtype of the LoRA factors: "auto" is the model's dtype off the CPU and where the
            compiled decoding step runs the fused branch, else fp32 (the CPU's small bf16 GEMMs are slower than
            fp32 ones).
        weight_layout: how the base weights are held for decoding: "auto" (tiles where the compiled step runs,
            else the fastest on this machine, measured once), "transposed", "rows", "packed", "gemv" or "tiles"
            (lorakit.serve.weights).
        decode_step: how steps that only decode run: "auto" (one compiled call per step where it applies: a bf16
            Llama-family model on a CPU with AVX-512 BF16, up to 16 rows, LoRA fused), "compiled" (an error
            where it cannot) or "torch" (lorakit.serve.decode_step).
    """

    max_batch_size: int = 16
    max_seq_len: int = 2048
    max_loaded_adapters: int = 8
    max_prefill_tokens: int = 2048
    max_queued: int | None = None
    lora_strategy: Literal["auto", "fused", "gather", "segment"] = "auto"
    prefill: Literal["with_decode", "separate"] = "with_decode"
    lora_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    weight_layout: Literal["auto", "transposed", "rows", "packed", "gemv", "tiles"] = "auto"
    decode_step: Literal["auto", "compiled", "torch"] = "auto"

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_seq_len", "max_loaded_adapters", "max_prefill_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LorakitError(f"{name}={value!r} is invalid: give a positive integer.")
        choices = {"lora_strategy": ("auto", "fused", "gather", "segment"), "prefill": ("with_decode", "separate"),
                   "lora_dtype": ("auto", "fp32", "bf16", "fp16"),
                   "weight_layout": ("auto", *LAYOUTS), "decode_step": STEP_CHOICES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise LorakitError(f"{name}={getattr(self, name)!r} is invalid: use one of {', '.join(allowed)}.")


@dataclass(eq=False)
class _Row:
    """A running request: its batch row (cache slot) and generation state."""

    handle: RequestHandle
    adapter: AdapterWeights | None
    slot: int
    text: IncrementalText
    generator: torch.Generator | None
    length: int = 0  # tokens in the cache
    next_token: int = -1  # sampled, not yet in the cache
    generated: list[int] = field(default_factory=list)

    @property
    def params(self) -> SamplingParams:
        return self.handle.request.params


class Engine:
    """Serves generation requests for one base model and any number of LoRA/DoRA adapters.

    Args:
        model: a Llama-family causal LM (transformers), plain (no adapters applied), in eval mode, in the
            dtype and on the device to serve in.
        tokenizer: its tokenizer (a chat template for chat prompts).
        config: sizes and strategies (`EngineConfig`).

    Raises:
        LorakitError: the model is not one the engine can run.
    """

    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.runner = LlamaRunner(model, config.max_batch_size, config.max_seq_len, config.weight_layout,
                                  config.decode_step)
        self.decode_step = "compiled" if self.runner.compiled_step is not None else "torch"  # "auto" resolved
        self.device = self.runner.device
        names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        # auto: the model's dtype off the CPU and where the compiled step runs the fused branch (bf16 factors halve
        # the bytes a step streams: 0.71x -> 0.82x the base at 16 rows, README, Serving), else fp32
        compiled_fused = self.runner.compiled_step is not None and config.lora_strategy in ("auto", "fused")
        self.lora_dtype = names.get(config.lora_dtype) or (
            torch.float32 if self.device.type == "cpu" and not compiled_fused else self.runner.dtype)
        self.lora_kernel = pick_lora_kernel(config.lora_strategy, self.device, self.runner.dtype, self.lora_dtype)
        # the strategy that runs ("auto" resolved)
        self.lora_strategy = "fused" if self.lora_kernel is not None else config.lora_strategy.replace("auto", "gather")
        self.segment_kernel = segments_kernel() if self.lora_kernel is not None else None  # new prompts' branch
        self.stop_ids = set(stop_token_ids(tokenizer))
        self.store = AdapterStore(self._read, config.max_loaded_adapters)
        dims = {g: (len(self.runner.layout), layout.in_features, layout.out_sizes)
                for g, layout in zip(GROUPS, self.runner.layout[0])}
        self.row_factors = RowFactors(dims, config.max_batch_size + 1, self.lora_dtype, self.device) \
            if self.lora_strategy == "gather" else None
        self.rows: list[_Row] = []
        self.queue: deque[RequestHandle] = deque()
        self.generated_tokens = 0
        self._plan: tuple[tuple, DecodePlan | None] = ((), None)
        self._lock = threading.Lock()  # the queue and the adapter store
        self._step_lock = threading.Lock()  # one step at a time
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = True

    @classmethod
    def from_pretrained(cls, model: str | None = None, config: EngineConfig | None = None, *,
                        dtype: torch.dtype | None = None, device: str | None = None) -> Engine:
        """An engine on a model that `lorakit.training.models.load_model` reads ("default", a .gguf file, a
        Hugging Face directory), in `dtype` (default: the device's fastest, bf16 where supported)."""
        from lorakit.training.models import default_dtype, load_model

        loaded = load_model(model, device=device, fast_cpu_attention=False)
        loaded.model.to(dtype or default_dtype(loaded.model.device))
        return cls(loaded.model, loaded.tokenizer, config)

    # ---- adapters ---------------------------------------------------------------------------------
    def _read(self, name: str, directory: Path) -> AdapterWeights:
        return read_adapter(name, directory, self.runner.layout, self.runner.base_weight, self.lora_dtype, self.device)

    def load_adapter(self, name: str, directory: str | Path) -> None:
        """Load the adapter in `directory` (PEFT format, by lorakit or PEFT) and serve it as `name`.

        Raises:
            LorakitError: bad name, name taken, or a directory that is missing, corrupt or does not fit
                this base; nothing already loaded changes then.
        """
        if not isinstance(name, str) or not name.strip():
            raise LorakitError(f"adapter name {name!r} is invalid: give a non-empty string.")
        weights = self._read(name, Path(directory))  # read and checked before anything changes
        with self._lock:
            self.store.register(weights)

    def unload_adapter(self, name: str) -> None:
        """Stop serving `name`; requests already running on it finish with it, new ones are refused, and
        queued ones finish with finish reason "error" (`requests_using` tells how many there are).

        Raises:
            LorakitError: no adapter has that name.
        """
        with self._lock:
            self.store.unregister(name)

    @property
    def adapters(self) -> list[str]:
        """The names of the adapters being served (in memory or read again on demand)."""
        with self._lock:
            return list(self.store.directories)

    # ---- requests ---------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | list[int] | list[dict[str, str]]) -> list[int]:
        """The token ids of a prompt (see `lorakit.serve.prompts.prompt_ids`).

        Raises:
            LorakitError: an empty prompt, ids outside the vocabulary, or messages the template cannot render.
        """
        return prompt_ids(self.tokenizer, prompt, self.runner.embed.weight.shape[0])

    def requests_using(self, name: str) -> int:
        """How many queued and running requests are on adapter `name` (e.g. to wait for them before unloading)."""
        with self._lock:
            queued = sum(h.request.adapter == name for h in self.queue)
        return queued + sum(r.handle.request.adapter == name for r in self.rows)

    def submit(self, request: Request) -> RequestHandle:
        """Queue a request; returns its handle at once (iterate it for the stream).

        Raises:
            LorakitError: an invalid prompt, an unknown adapter, a prompt plus max_tokens longer than
                max_seq_len, a full queue, or a stopped engine.
        """
        if not isinstance(request, Request):
            raise LorakitError(f"submit takes a lorakit.serve.Request, got {type(request).__name__}.")
        ids = self.prompt_ids(request.prompt)
        total = len(ids) + request.params.max_tokens
        if total > self.config.max_seq_len:
            raise LorakitError(f"the prompt ({len(ids)} tokens) plus max_tokens ({request.params.max_tokens}) is "
                               f"{total} tokens, over the engine's max_seq_len of {self.config.max_seq_len}; "
                               "shorten the prompt or lower max_tokens.")
        handle = RequestHandle(request, ids, self)
        with self._lock:
            if not self._accepting:
                raise LorakitError("the engine is stopping and accepts no new requests.")
            if request.adapter is not None:
                self.store.check(request.adapter)
            if self.config.max_queued is not None and len(self.queue) >= self.config.max_queued:
                raise LorakitError(f"the queue is full ({self.config.max_queued} requests waiting); retry later.")
            self.queue.append(handle)
        self._wake.set()
        return handle

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Serve `requests` together and return their completions in order (runs the steps itself unless
        the engine's thread runs)."""
        handles = [self.submit(r) for r in requests]
        return [h.result() for h in handles]

    # ---- the engine's own thread ------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether the engine's thread runs the steps (else whoever reads a handle runs them)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Engine:
        """Run the steps in a background thread until `stop`; returns the engine."""
        if not self.running:
            self._stopping, self._accepting = False, True
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                worked = self.step()
            except Exception as e:  # a failed step must not hang its clients: fail its rows, keep serving
                self._fail_running(f"the engine failed a step: {type(e).__name__}: {e}")
                worked = True
            if not worked:
                self._wake.wait(0.1)

    def stop(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting requests, let running and queued ones finish for up to `drain_timeout` seconds,
        then abort the rest (finish reason "abort") and stop the thread."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while (self.rows or self.queue) and time.monotonic() < deadline:
            if not self.running:
                self.step()
            else:
                time.sleep(0.01)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            for handle in self.queue:
                handle.cancel()
        for row in self.rows:
            row.handle.cancel()
        self.step()

    def _fail_running(self, message: str) -> None:
        with self._step_lock:
            for row in self.rows:
                if not row.handle.done:
                    self._release(row)
                    row.handle.push(Delta("", [], "error"), self._completion(
                        row.handle, row.text.final_text, row.generated, "error", message))
            self.rows = []

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """Counts for monitoring: running and queued requests, adapters served and in memory, tokens generated."""
        with self._lock:
            return {"running": len(self.rows), "queued": len(self.queue), "adapters": len(self.store.directories),
                    "adapters_in_memory": len(self.store.loaded), "generated_tokens": self.generated_tokens,
                    "max_batch_size": self.config.max_batch_size}

    # ---- the step ---------------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit what fits, run one forward, stream one token per row, retire finished rows.

        Returns:
            False when there was nothing to do.
        """
        with self._step_lock:
            with self._lock:
                changed = self._drop_cancelled()
                new = self._admit()
            decoding = sorted(self.rows, key=lambda r: r.slot)
            if not decoding and not new:
                return changed
            self.rows += new
            if self.config.prefill == "separate" and new and decoding:
                self._forward([], new)
                self._forward(decoding, [])
            else:
                self._forward(decoding, new)
            self.rows = [r for r in self.rows if not r.handle.done]
            self._relayout()
            return True

    def _admit(self) -> list[_Row]:
        new: list[_Row] = []
        budget = self.config.max_prefill_tokens
        while self.queue and len(self.rows) + len(new) < self.config.max_batch_size:
            handle = self.queue[0]
            if handle.cancelled:
                self.queue.popleft()
                self._finish_unstarted(handle, "abort")
                continue
            if new and len(handle.prompt_ids) > budget:
                break
            adapter = None
            if handle.request.adapter is not None:
                try:
                    adapter = self.store.acquire(handle.request.adapter)
                except LorakitError as e:
                    self.queue.popleft()
                    self._finish_unstarted(handle, "error", str(e))
                    continue
                if adapter is None:  # memory is full of adapters that running rows use: wait for one to finish
                    break
            self.queue.popleft()
            budget -= len(handle.prompt_ids)
            slot = len(self.rows) + len(new)
            if self.row_factors is not None and adapter is not None:
                self.row_factors.assign(slot, adapter)
            params = handle.request.params
            new.append(_Row(handle, adapter, slot, IncrementalText(self.tokenizer, params.stop),
                            make_generator(params, self.device)))
        return new

    def _decode_plan(self, decoding: list[_Row], occupied: list[int]) -> DecodePlan | None:
        """The per-row LoRA plan of the decoding rows, rebuilt only when their adapters or buffers change."""
        adapters = [r.adapter for r in decoding if r.adapter is not None]  # rows 0..n_lora-1 (see _relayout)
        factors = self.row_factors
        key = (tuple(id(a) for a in adapters), factors.version if factors is not None else 0)
        if key != self._plan[0]:
            plan = None
            if adapters and self.lora_kernel is not None:
                plan = FusedPlan(adapters, self.lora_kernel)
            # one adapter on every row (batch-1 decoding above all): its two plain GEMMs per group beat the
            # gather's per-projection batched matmuls (README, Serving: 0.84x -> 0.95x the base at batch 1)
            elif adapters and all(a is adapters[0] for a in adapters):
                plan = OneAdapterPlan(adapters[0], len(adapters))
            elif adapters and factors is not None:
                factors.fit(occupied)  # blocks as wide as the rows in the cache need
                plan = GatherPlan(factors, adapters)
            elif adapters:
                plan = SegmentPlan(adapters, self.device)
            self._plan = ((key[0], factors.version if factors is not None else 0), plan)
        return self._plan[1]

    def _forward(self, decoding: list[_Row], new: list[_Row]) -> None:
        tokens = [r.next_token for r in decoding]
        positions = [r.length for r in decoding]
        prefills, segments, logit_rows = [], [], list(range(len(decoding)))
        for row in new:
            start, n = len(tokens), len(row.handle.prompt_ids)
            tokens += row.handle.prompt_ids
            positions += range(n)
            prefills.append((row.slot, start, n))
            logit_rows.append(start + n - 1)
            if row.adapter is not None:
                segments.append((start, start + n, row.adapter))
        plan = self._decode_plan(decoding, [r.slot for r in self.rows]) if decoding else None
        lora = LoraBatch(plan, segments, self.segment_kernel) if plan is not None or segments else None
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)
        batch = StepBatch(as_tensor(tokens), as_tensor(positions), len(decoding), prefills, as_tensor(logit_rows), lora)
        logits = self.runner.forward(batch)
        rows = decoding + new
        sampled = sample(logits, [r.params for r in rows], [r.generator for r in rows])
        for row in decoding:
            row.length += 1
        for row in new:
            row.length = len(row.handle.prompt_ids)
        for row, token in zip(rows, sampled):
            self._emit(row, token)

    def _emit(self, row: _Row, token: int) -> None:
        params = row.params
        row.generated.append(token)
        row.next_token = token
        self.generated_tokens += 1
        stop_token = token in self.stop_ids and not params.ignore_eos
        text = "" if stop_token else row.text.add(token)
        finish = "stop" if stop_token or row.text.stopped else "length" if len(row.generated) >= params.max_tokens else None
        if finish is None:
            row.handle.push(Delta(text, [token]))
            return
        text += row.text.flush()
        self._release(row)
        row.handle.push(Delta(text, [token], finish), self._completion(row.handle, row.text.final_text,
                                                                       row.generated, finish))

    def _completion(self, handle: RequestHandle, text: str, tokens: list[int], finish: str,
                    error: str | None = None) -> Completion:
        now = time.perf_counter()
        ttft = None if handle.first_token_at is None else handle.first_token_at - handle.submitted_at
        if ttft is None and tokens:
            ttft = now - handle.submitted_at
        return Completion(handle.request.request_id, handle.request.adapter, text, list(tokens), finish,
                          len(handle.prompt_ids), len(tokens), ttft, now - handle.submitted_at, error)

    def _release(self, row: _Row) -> None:
        if row.adapter is not None:
            with self._lock:
                self.store.release(row.adapter)

    def _finish_unstarted(self, handle: RequestHandle, finish: str, error: str | None = None) -> None:
        handle.push(Delta("", [], finish), self._completion(handle, "", [], finish, error))

    def _drop_cancelled(self) -> bool:
        cancelled = [r for r in self.rows if r.handle.cancelled]
        for row in cancelled:
            if row.adapter is not None:
                self.store.release(row.adapter)
            row.handle.push(Delta("", [], "abort"), self._completion(row.handle, row.text.final_text, row.generated, "abort"))
        if cancelled:
            self.rows = [r for r in self.rows if not r.handle.cancelled]
            self._relayout()
        return bool(cancelled)

    def _relayout(self) -> None:
        """Pack the running rows into slots 0..n-1, rows on adapters first (moving cache rows as needed)."""
        moves = layout_moves([r.slot for r in self.rows], [r.adapter is not None for r in self.rows],
                             self.runner.cache.spare)
        at = {r.slot: r for r in self.rows}
        for src, dst in moves:
            row = at.pop(src)
            self.runner.cache.move(src, dst, row.length)
            if self.row_factors is not None and row.adapter is not None:
                self.row_factors.move(src, dst)
            row.slot = dst
            at[dst] = row
