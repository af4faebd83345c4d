import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from conftest import ROOT, run_train
from checkpoint import load_checkpoint
from model import GPT

CHECKPOINT_KEYS = {"version", "model", "model_args", "optimizer", "iter_num", "best_val_loss", "config"}


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_lora_run_moves_only_the_adapters(hf_gpt2_dir, small_data_dir, tmp_path, capsys):
    out = tmp_path / "lora"
    run_train(f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={out}", "max_iters=4",
              "rank=8", "alpha=32", "lr=1e-2")
    assert sorted(os.listdir(out)) == ["ckpt.pt", "ckpt_last.pt", "metrics.jsonl", "resume.pt"]
    printed = capsys.readouterr().out
    assert "trainable parameters: 6,144 of 3,339,072 (0.18%)" in printed
    assert "no wandb key: logging locally" in printed
    start = GPT.from_pretrained(str(hf_gpt2_dir)).state_dict()
    for name in ("ckpt.pt", "ckpt_last.pt"):
        ckpt = load_checkpoint(out / name)
        assert CHECKPOINT_KEYS <= set(ckpt)
        assert ckpt["model_args"]["lora_rank"] == 8 and ckpt["config"]["lora_alpha"] == 32.0
        moved = set()
        for key, value in ckpt["model"].items():
            if "lora_" in key:
                continue
            assert torch.equal(value, start[key]), key  # base weights exactly as loaded
        for key, value in ckpt["model"].items():
            if key.endswith("lora_B") and value.abs().sum() > 0:
                moved.add(key)
        assert len(moved) == 6 or name == "ckpt.pt"
    last = load_checkpoint(out / "ckpt_last.pt")
    assert last["iter_num"] == 4
    rows = metrics(out)
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 2, 4]
    assert all(r["val_time"] > 0 and r["ckpt_wait"] >= 0 for r in rows if "val_loss" in r)
    assert [r["iter"] for r in rows if "train_loss" in r] == [1, 2, 3, 4]
    assert last["best_val_loss"] == min(r["val_loss"] for r in rows if "val_loss" in r)
    best = load_checkpoint(out / "ckpt.pt")
    assert best["best_val_loss"] == last["best_val_loss"]


def test_full_fine_tuning_moves_the_base_weights(hf_gpt2_dir, small_data_dir, tmp_path, capsys):
    out = tmp_path / "full"
    run_train(f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={out}", "max_iters=2", "rank=0")
    assert "trainable parameters: 3,332,928 of 3,332,928 (100.00%)" in capsys.readouterr().out
    start = GPT.from_pretrained(str(hf_gpt2_dir)).state_dict()
    final = load_checkpoint(out / "ckpt_last.pt")["model"]
    assert not any("lora_" in k for k in final)
    for key in ("transformer.h.0.attn.q_attn.weight", "transformer.h.1.mlp.c_fc.weight", "transformer.wte.weight"):
        assert not torch.equal(final[key], start[key]), key
    for name in ("ckpt.pt", "ckpt_last.pt"):  # the tied embedding is stored once
        model = load_checkpoint(out / name)["model"]
        assert model["lm_head.weight"].data_ptr() == model["transformer.wte.weight"].data_ptr()
    resume = load_checkpoint(out / "resume.pt")["model"]
    assert set(resume) == set(final) - {"lm_head.weight"}
    run_train("init_from=resume", f"out_dir={out}", "max_iters=3")
    assert load_checkpoint(out / "ckpt_last.pt")["iter_num"] == 3


def test_training_goes_on_while_a_checkpoint_is_written(hf_gpt2_dir, small_data_dir, tmp_path, monkeypatch):
    import train
    events, stepped = [], threading.Event()
    real_step, real_write = train.train_step, train.write_checkpoint

    def step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        events.append("step")
        stepped.set()
        return result

    def slow_write(path, checkpoint):
        name = os.path.basename(path)
        if not events:  # the first checkpoint is held back until training has taken a step
            assert stepped.wait(timeout=120)
            # and it is still the state at iteration 0, although the model has moved on
            assert checkpoint["iter_num"] == 0 and checkpoint["optimizer"]["state"] == {}
            assert all(not t.any() for k, t in checkpoint["model"].items() if k.endswith("lora_B"))
        real_write(path, checkpoint)
        events.append(name)

    monkeypatch.setattr(train, "train_step", step)
    monkeypatch.setattr(train, "write_checkpoint", slow_write)
    out = tmp_path / "run"
    run_train(f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={out}", "max_iters=2",
              "rank=8", "alpha=32", "lr=1e-2")
    assert events[0] == "step" and events.count("step") == 2 and events[-1] == "ckpt_last.pt"
    resume = load_checkpoint(out / "resume.pt")
    assert resume["iter_num"] == 2 and any(t.any() for k, t in resume["model"].items() if k.endswith("lora_B"))


def test_scratch_model_learns_the_task(small_data_dir, tmp_path):
    out = tmp_path / "scratch"
    run_train("init_from=scratch", f"dataset={small_data_dir}", f"out_dir={out}", "max_iters=30",
              "eval_interval=10", "n_layer=2", "n_head=2", "n_embd=64", "block_size=128", "lr=3e-3")
    rows = metrics(out)
    train_losses = [r["train_loss"] for r in rows if "train_loss" in r]
    val_losses = [r["val_loss"] for r in rows if "val_loss" in r]
    # measured: 10.76 -> 0.79 (train), 10.74 -> 0.73 (validation); answer tokens only
    assert train_losses[0] > 10 and train_losses[-1] < 1.5
    assert val_losses[0] > 10 and val_losses[-1] < 1.5


def trainable_params(path):
    return {k: v for k, v in load_checkpoint(path)["model"].items()}


def test_micro_batch_split_does_not_change_the_step(hf_gpt2_dir, small_data_dir, tmp_path):
    common = (f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", "max_iters=1", "rank=8", "alpha=32",
              "lora_dropout=0", "lr=1e-2")
    run_train(*common, f"out_dir={tmp_path / 'a'}", "batch_size=8", "gradient_accumulation_steps=1")
    run_train(*common, f"out_dir={tmp_path / 'b'}", "batch_size=2", "gradient_accumulation_steps=4")
    a, b = trainable_params(tmp_path / "a" / "resume.pt"), trainable_params(tmp_path / "b" / "resume.pt")
    assert a.keys() == b.keys() and len(a) == 12
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.endswith("lora_B"))


def test_resume_continues_exactly(hf_gpt2_dir, small_data_dir, tmp_path):
    common = (f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", "rank=8", "alpha=32", "lr=1e-2",
              "lora_dropout=0.1", "dropout=0.1")
    run_train(*common, f"out_dir={tmp_path / 'straight'}", "max_iters=4")
    run_train(*common, f"out_dir={tmp_path / 'split'}", "max_iters=2")
    run_train("init_from=resume", f"out_dir={tmp_path / 'split'}", "max_iters=4")
    straight = load_checkpoint(tmp_path / "straight" / "ckpt_last.pt")
    split = load_checkpoint(tmp_path / "split" / "ckpt_last.pt")
    assert split["iter_num"] == 4 and split["config"]["init_from"] == str(hf_gpt2_dir)
    for key, value in straight["model"].items():
        assert torch.equal(value, split["model"][key]), key

    def losses(out):
        return [{k: r[k] for k in ("iter", "train_loss", "val_loss") if k in r} for r in metrics(out)]
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")


def test_resume_refuses_a_different_architecture(hf_gpt2_dir, small_data_dir, tmp_path, capsys):
    out = tmp_path / "r"
    run_train(f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={out}", "max_iters=1", "rank=8")
    before = {p: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_train("init_from=resume", f"out_dir={out}", "rank=16", "max_iters=2")
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"train.py: error: lora_rank=16 differs from the checkpoint's lora_rank=8 in {out / 'resume.pt'}; "
        "drop the flag or use a new out_dir")
    assert {p: p.read_bytes() for p in out.iterdir()} == before


def test_torchrun_two_processes_on_cpu(hf_gpt2_dir, small_data_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "train.py",
           f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={out}", "max_iters=2", "rank=8",
           "batch_size=4", "gradient_accumulation_steps=2", "eval_interval=2", "eval_test=false", "device=cpu",
           "lora_dropout=0"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["ckpt.pt", "ckpt_last.pt", "metrics.jsonl", "resume.pt"]
    assert result.stdout.count("no wandb key") == 1  # only rank 0 speaks and writes
    # two processes of 4 examples each take the same step as one process of 8
    run_train(f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={tmp_path / 'one'}", "max_iters=2",
              "rank=8", "batch_size=8", "gradient_accumulation_steps=1", "lora_dropout=0")
    ddp, one = trainable_params(out / "resume.pt"), trainable_params(tmp_path / "one" / "resume.pt")
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=0, atol=1e-6)


def test_wandb_offline_never_shows_the_key(hf_gpt2_dir, small_data_dir, tmp_path):
    key = "0123456789abcdef0123456789abcdef01234567"
    out = tmp_path / "wb"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_API_KEY=key, WANDB_SILENT="false")
    cmd = [sys.executable, "train.py", f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={out}",
           "max_iters=2", "rank=8", "batch_size=8", "gradient_accumulation_steps=1", "eval_test=false", "device=cpu"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "wandb").is_dir() and list((out / "wandb").glob("offline-run-*"))
    assert key not in result.stdout and key not in result.stderr
    for path in out.iterdir():
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
    for name in ("ckpt.pt", "ckpt_last.pt", "resume.pt"):
        assert key not in json.dumps(load_checkpoint(out / name)["config"])
