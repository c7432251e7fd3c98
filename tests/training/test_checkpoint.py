"""Tests for lorakit.training.checkpoint: a failed save leaves the previous checkpoint whole; load restores it."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import input_ids, randomize_lora, tiny_llama

import lorakit
from lorakit.training import checkpoint
from lorakit.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def lora_run(seed: int = 0):
    """A tiny LoRA model with B != 0, its AdamW (with moments after one step) and a scheduler."""
    model = tiny_llama()
    lorakit.apply(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model(input_ids()).logits.square().mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer, scheduler


def save(directory, step, model, optimizer, scheduler):
    return save_checkpoint(directory, step, model, lambda d: lorakit.save_adapter(model, d), optimizer, scheduler,
                           {"loss": 1.0})


def trainable(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def fail_mid_save(monkeypatch, where: str) -> None:
    """Make the next checkpoint write fail part-way: after its adapter, or at its last file."""
    if where == "adapter":
        original = lorakit.save_adapter

        def adapter_then_fail(model, directory, *args, **kwargs):
            original(model, directory, *args, **kwargs)
            raise OSError("No space left on device")

        monkeypatch.setattr(lorakit, "save_adapter", adapter_then_fail)
    else:
        def dumps_fails(*args, **kwargs):
            raise OSError("No space left on device")

        monkeypatch.setattr(checkpoint.json, "dumps", dumps_fails)


@pytest.mark.parametrize("where", ["adapter", "state"])
@pytest.mark.parametrize("step", [4, 2], ids=["next step", "same step again"])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where, step):
    model, optimizer, scheduler = lora_run()
    good = save(tmp_path, 2, model, optimizer, scheduler)
    files = {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()}
    saved = trainable(model)

    with torch.no_grad():  # the run moves on, then its next save fails part-way
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    fail_mid_save(monkeypatch, where)
    with pytest.raises(OSError, match="No space left"):
        save(tmp_path, step, model, optimizer, scheduler)
    monkeypatch.undo()

    assert latest_checkpoint(tmp_path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", good.name], "no partial directory is left"
    assert {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()} == files

    fresh, fresh_optimizer, fresh_scheduler = lora_run(seed=5)
    meta = load_checkpoint(good, fresh, fresh_optimizer, fresh_scheduler)
    assert meta["step"] == 2 and meta["loss"] == 1.0
    restored = trainable(fresh)
    assert all(torch.equal(restored[k], saved[k]) for k in saved)
    assert any(v.abs().sum() > 0 for k, v in restored.items() if "lora_B" in k)
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    moments = fresh_optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(moments, optimizer.state_dict()["state"][0]["exp_avg"])
    assert json.loads((good / "trainer_state.json").read_text())["step"] == 2


# ---- full disk, checksums ------------------------------------------------------------------------------
def tmpfs_or_skip(directory, size: str):
    import subprocess

    directory.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                      capture_output=True).returncode != 0:
        return None
    return lambda: subprocess.run(["umount", "-l", str(directory)], check=False)


def free_bytes(directory) -> int:
    import os

    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    """On a real 4 MiB tmpfs where the machine allows mounting, else with ENOSPC injected at the write."""
    import errno

    disk = tmp_path / "disk"
    unmount = tmpfs_or_skip(disk, "4m")
    try:
        model, optimizer, scheduler = lora_run()
        good = save(disk, 2, model, optimizer, scheduler)
        size = sum(p.stat().st_size for p in good.rglob("*") if p.is_file())
        filler = disk / "filler"
        if unmount:
            filler.write_bytes(b"\0" * max(free_bytes(disk) - size // 2, 0))
        else:
            original = checkpoint.Path.write_bytes

            def full(self, data):
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
            monkeypatch.setattr(checkpoint.Path, "write_bytes", full)
        with pytest.raises(lorakit.LorakitError, match=f"no space left on the device while writing checkpoint .*"
                                                       f"step-00000004.*the last complete checkpoint {good} is intact"):
            save(disk, 4, model, optimizer, scheduler)
        assert sorted(p.name for p in disk.iterdir() if p.name != "filler") == ["latest", good.name]
        assert latest_checkpoint(disk) == good and checkpoint.checkpoint_problem(good) is None
        if unmount:
            filler.unlink()  # space freed: the next save works
        else:
            monkeypatch.setattr(checkpoint.Path, "write_bytes", original)
        assert save(disk, 4, model, optimizer, scheduler).name == "step-00000004"
        assert checkpoint.checkpoint_problem(disk / "step-00000004") is None
    finally:
        if unmount:
            unmount()


def test_checksums_name_the_changed_missing_or_added_file(tmp_path):
    model, optimizer, scheduler = lora_run()
    path = save(tmp_path, 2, model, optimizer, scheduler)
    assert checkpoint.checkpoint_problem(path) is None
    (path / "extra.bin").write_bytes(b"x")
    assert "extra.bin is not recorded" in checkpoint.checkpoint_problem(path)
    (path / "extra.bin").unlink()
    (path / "adapter" / "adapter_config.json").unlink()
    assert "adapter/adapter_config.json is missing" in checkpoint.checkpoint_problem(path)
    (path / "checksums.json").write_text("[" * 10_000)
    assert "checksums.json is unreadable" in checkpoint.checkpoint_problem(path)
    (tmp_path / "latest").write_bytes(b"\xff\xfe")  # a garbled pointer: older checkpoints are still tried
    assert checkpoint.resumable_checkpoint(tmp_path)[0] is None
