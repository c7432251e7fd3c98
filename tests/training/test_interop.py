"""A lorakit-adapted model trained by transformers.Trainer and TRL's SFTTrainer equals lorakit's own loop."""
import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig
from lorakit.methods.lora import LoraOptions
from lorakit.training.config import TrainConfig
from lorakit.training.data.records import load_records
from lorakit.training.data.tokenize import tokenize_records
from lorakit.training.interop import Collator, SaveAdapterCallback
from lorakit.training.loop import train
from lorakit.training.models import load_model
from lorakit.training.tasks import builtin_task

# One batch holds every sample, so the trainers' own sampling order cannot change what a step sees.
N, STEPS, LR, R = 8, 3, 1e-3, 4
SAME = dict(max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, per_device_train_batch_size=N, seed=0, report_to="none", use_cpu=True,
            save_strategy="steps", save_steps=2, logging_steps=1, disable_tqdm=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    train_rows, eval_rows = builtin_task(n_train=N, n_eval=2, seed=3)
    directory = tmp_path_factory.mktemp("interop-data")
    for name, rows in (("train.jsonl", train_rows), ("eval.jsonl", eval_rows)):
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory / "train.jsonl", directory / "eval.jsonl"


@pytest.fixture(scope="module")
def own_loop(tiny_model_dir, data, tmp_path_factory):
    """lorakit's own loop: the adapter it writes."""
    out = tmp_path_factory.mktemp("own") / "run"
    train(TrainConfig(model=str(tiny_model_dir), data=str(data[0]), eval_data=str(data[1]), output=str(out),
                      max_steps=STEPS, batch_size=N, lr=LR, warmup_steps=0, schedule="constant", lora=LoraOptions(r=R),
                      precision="fp32", device="cpu", eval_samples=0, quiet=True,
                      preserve=0))  # the plain loss: transformers.Trainer has no preservation term
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def adapted(tiny_model_dir, train_file):
    """The base as lorakit's loop loads it, LoRA applied with the loop's seed, and its tokenized examples."""
    loaded = load_model(str(tiny_model_dir), dtype=torch.float32, device="cpu")
    records, fmt = load_records(train_file)
    examples = tokenize_records(records, loaded.tokenizer, fmt, max_seq_len=512)
    torch.manual_seed(0)
    lorakit.apply(loaded.model, LoraConfig(r=R, lora_alpha=16, target_modules="all-linear"))
    loaded.model.train()
    return loaded, examples


def assert_same_adapter(theirs: dict, ours: dict) -> None:
    assert theirs.keys() == ours.keys()
    assert any(t.abs().max() > 1e-3 for k, t in theirs.items() if "lora_B" in k)  # it trained: B != 0
    # Same fp32 math in another order: measured at most 1.6e-7 apart on B factors of ~3e-3 after 3 steps.
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-4, atol=1e-6, msg=key)


def assert_peft_loads(tiny_model_dir, adapter_dir, trained) -> None:
    """PEFT reads the saved adapter onto a fresh base and computes what the trained model computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    trained.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, trained(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)


def test_transformers_trainer_matches_lorakit_loop(tiny_model_dir, data, own_loop, tmp_path):
    from transformers import Trainer, TrainingArguments

    loaded, examples = adapted(tiny_model_dir, data[0])
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), remove_unused_columns=False, **SAME)
    trainer = Trainer(model=loaded.model, args=args, train_dataset=examples,
                      data_collator=Collator(loaded.tokenizer.pad_token_id), callbacks=[SaveAdapterCallback()])
    trainer.train()
    assert_same_adapter(load_file(str(tmp_path / "hf" / "adapter" / "adapter_model.safetensors")), own_loop)
    assert (tmp_path / "hf" / "checkpoint-2" / "adapter" / "adapter_config.json").is_file()
    assert_peft_loads(tiny_model_dir, tmp_path / "hf" / "adapter", loaded.model)


def test_trl_sft_trainer_matches_lorakit_loop(tiny_model_dir, data, own_loop, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    loaded, examples = adapted(tiny_model_dir, data[0])
    args = SFTConfig(output_dir=str(tmp_path / "trl"), gradient_checkpointing=False, bf16=False, max_length=None,
                     **SAME)
    trainer = SFTTrainer(model=loaded.model, args=args, train_dataset=Dataset.from_list(examples),
                         processing_class=loaded.tokenizer, callbacks=[SaveAdapterCallback()])
    trainer.train()
    assert_same_adapter(load_file(str(tmp_path / "trl" / "adapter" / "adapter_model.safetensors")), own_loop)
    assert_peft_loads(tiny_model_dir, tmp_path / "trl" / "adapter", loaded.model)
