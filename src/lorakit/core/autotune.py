"""Kernels chosen per machine: a hardware-dependent choice is measured once on its real shapes, and the
winner is cached per machine (CPU model, torch version, threads) in $LORAKIT_HOME/autotune.json.

A choice is a name, a key for the shapes it was measured on, and candidates (name -> a function that runs
the work once). Every candidate computes the same result (their tests check it); only speed differs,
and which one wins differs between CPUs (Sapphire Rapids' AMX makes bf16 GEMMs cheap; Zen 4 has no AMX).
`LORAKIT_AUTOTUNE=0` skips measuring and takes each choice's first candidate (its default).

File shape: {machine key: {"<choice>[<shape key>]": {"choice": name, "seconds": {name: s, ...}}}}.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from lorakit.core.fsutil import atomic_write_text

FILE_NAME = "autotune.json"


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name as lscpu shows it (/proc/cpuinfo) with its family and model numbers, else what
    platform knows."""
    try:
        described = describe_cpu(Path("/proc/cpuinfo").read_text())
        if described:
            return described
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_cpu(cpuinfo: str) -> str | None:
    """"<model name> (family F, model M)" from /proc/cpuinfo's text; None without a model name.

    The numbers tell apart CPUs a hypervisor names alike: "AMD EPYC" is Zen 2 as family 23 model 49 and
    Zen 4 as family 25 model 17, and their kernel choices differ.
    """
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if "model name" not in fields:
        return None
    numbers = [f"{label} {fields[key]}" for label, key in (("family", "cpu family"), ("model", "model")) if key in fields]
    return fields["model name"] + (f" ({', '.join(numbers)})" if numbers else "")


def machine_key() -> str:
    """What a cached decision is valid for: a new CPU, torch or thread count measures afresh."""
    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def cache_file() -> Path:
    return Path(os.environ.get("LORAKIT_HOME") or "~/.cache/lorakit").expanduser() / FILE_NAME


def _read() -> dict:
    try:
        data = json.loads(cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or corrupt: measure again and rewrite it


def _seconds(run: Callable[[], None], repeats: int) -> float:
    run()  # warm-up: kernel selection, first-touch page faults
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Decisions made in this process, so each is looked up (or measured) once.
_decided: dict[str, str] = {}


def choose(name: str, shape_key: str, candidates: dict[str, Callable[[], None]], repeats: int = 5) -> str:
    """The fastest of `candidates` for choice `name` on shapes `shape_key`, measured once per machine.

    Args:
        name: the choice, e.g. "cpu_attention".
        shape_key: the shapes measured, e.g. "b4 t256 h9/3 d64 bfloat16".
        candidates: candidate name -> a function doing the work once; the first is the default.
        repeats: timed runs per candidate (the median counts).

    Returns:
        The winning candidate's name.
    """
    entry = f"{name}[{shape_key}]"
    if entry in _decided:
        return _decided[entry]
    if os.environ.get("LORAKIT_AUTOTUNE", "1") == "0":
        return next(iter(candidates))
    data = _read()
    cached = data.get(machine_key(), {}).get(entry, {})
    if isinstance(cached, dict) and cached.get("choice") in candidates:
        _decided[entry] = cached["choice"]
        return cached["choice"]
    seconds = {candidate: _seconds(run, repeats) for candidate, run in candidates.items()}
    winner = min(seconds, key=seconds.get)
    data = _read()  # another process may have written meanwhile: keep its entries
    data.setdefault(machine_key(), {})[entry] = {"choice": winner, "seconds": seconds}
    try:
        cache_file().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_file(), json.dumps(data, indent=2, sort_keys=True))
    except OSError:
        pass  # a read-only home: the decision still holds for this process
    _decided[entry] = winner
    return winner


def decisions() -> dict[str, dict]:
    """This machine's cached decisions: {"<choice>[<shapes>]": {"choice", "seconds"}}."""
    return dict(_read().get(machine_key(), {}))


def forget_process_decisions() -> None:
    """Drop this process's memo (tests; a changed LORAKIT_HOME)."""
    _decided.clear()
