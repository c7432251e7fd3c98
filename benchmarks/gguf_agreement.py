"""llama.cpp vs lorakit on a trained adapter of the embedded model: the README's GGUF agreement table.

For each outtype x (adapter file over the base GGUF, merged file): max |next-token logit difference| over the
prompt positions (median over prompts, and the worst), argmax agreement, greedy exact match of 32 tokens on
held-out items of the built-in task, identical text to lorakit's own greedy, file size; then llama.cpp's
decoding speed for base, base + adapter and merged.

    PYTHONPATH=src .venv/bin/python benchmarks/gguf_agreement.py RUN_OR_ADAPTER_DIR [--prompts 20]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from llama_cpp import Llama

from lorakit.tools.export_gguf.command import adapter_dir_of, export_gguf
from lorakit.training.data.render import prompts_and_references
from lorakit.training.evaluate import exact_match
from lorakit.training.generation import stop_token_ids
from lorakit.training.loading import load_with_adapter
from lorakit.training.models import model_file
from lorakit.training.tasks import builtin_task


def lorakit_side(loaded, pairs, tokens):
    model, tok = loaded.model, loaded.tokenizer
    stops = stop_token_ids(tok)
    out = []
    with torch.no_grad():
        for prompt, _ in pairs:
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([ids])).logits[0].numpy()
            gen = model.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id)[0, len(ids):]
            out.append((ids, logits, tok.decode(gen, skip_special_tokens=True).strip()))
    return tok, stops, out


def llama_side(model_path, lora, reference, tok, stops, pairs, tokens):
    llm = Llama(model_path=str(model_path), lora_path=str(lora) if lora else None, logits_all=True, n_ctx=512,
                n_batch=512, n_threads=2, verbose=False)
    diffs, agree, em, same, n_gen, gen_s = [], [], 0, 0, 0, 0.0
    for (ids, ours, our_text), (_, ref) in zip(reference, pairs):
        llm.reset()
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
        diffs.append(np.abs(theirs - ours).max())
        agree += list(theirs.argmax(-1) == ours.argmax(-1))
        start, gen = time.perf_counter(), []
        for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            if t in stops or len(gen) == tokens:
                break
            gen.append(t)
        gen_s, n_gen = gen_s + time.perf_counter() - start, n_gen + len(gen)
        text = tok.decode(gen, skip_special_tokens=True).strip()
        em, same = em + exact_match(text, ref), same + (text == our_text)
    llm.close()
    n = len(pairs)
    return (f"{np.median(diffs):.3f} | {max(diffs):.3f} | {np.mean(agree):.1%} | {em / n:.0%} | {same / n:.0%}",
            n_gen / gen_s)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--outtypes", default="f32,f16,bf16,q8_0")
    args = parser.parse_args()
    adapter = adapter_dir_of(args.run)
    loaded = load_with_adapter(None, str(adapter), device="cpu", precision="fp32")
    pairs = prompts_and_references(builtin_task(n_eval=100)[1][: args.prompts], loaded.tokenizer, "instruction")
    tok, stops, reference = lorakit_side(loaded, pairs, args.tokens)
    our_em = sum(exact_match(t, r) for (_, _, t), (_, r) in zip(reference, pairs)) / len(pairs)
    print(f"lorakit (fp32, unmerged) greedy exact match: {our_em:.0%} on {len(pairs)} held-out prompts, "
          f"{args.tokens} tokens\n")
    base = model_file(None)[1]
    print("| file | size (MiB) | median max abs logit diff | worst | argmax agreement | exact match | same text as lorakit | llama.cpp tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    row, speed = llama_side(base, None, reference, tok, stops, pairs, args.tokens)
    print(f"| base alone (no adapter; vs lorakit with adapter) | {base.stat().st_size / 2**20:.0f} | {row} | {speed:.0f} |")
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in args.outtypes.split(","):
            for merged in (False, True):
                result = export_gguf(adapter, Path(tmp) / f"{outtype}-{merged}", merged=merged, outtype=outtype)
                row, speed = llama_side(result.gguf_file if merged else base, None if merged else result.gguf_file,
                                        reference, tok, stops, pairs, args.tokens)
                label = f"{'merged' if merged else 'adapter'} {outtype}"
                print(f"| {label} | {result.gguf_file.stat().st_size / 2**20:.1f} | {row} | {speed:.0f} |", flush=True)
                result.gguf_file.unlink()


if __name__ == "__main__":
    sys.exit(main())
