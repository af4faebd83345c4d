import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, losses, run_train
from harness.checkpoints import base_fingerprint, load_checkpoint, load_model
from finetune import apply_method
from model import GPT

EVALUATION_KEYS = {"version", "run_id", "model", "model_args", "base", "iter_num", "best_val_loss", "config",
                   "data"}
RESUME_KEYS = EVALUATION_KEYS | {"optimizer", "scaler", "rng"}
LORA_NAMES = {f"transformer.h.{i}.attn.{p}_attn.lora_{m}" for i in range(2) for p in "qkv" for m in "AB"}


def metrics(out_dir):
    return [json.loads(line)
            for line in (out_dir / "metrics.jsonl").read_text().splitlines()[1:]]  # after the run's id


def tensor_bytes(state):
    return sum(t.numel() * t.element_size() for t in state.values())


def test_lora_run_stores_only_the_adapters(hf_gpt2_dir, small_data_dir, tmp_path, capsys):
    out = tmp_path / "lora"
    run_train(f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={out}", "max_iters=4",
              "rank=8", "alpha=32", "lr=1e-2")
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt", "ckpt_last.pt", "metrics.jsonl"]
    captured = capsys.readouterr()
    printed = captured.out
    assert "trainable parameters: 6,144 of 3,339,072 (0.18%)" in printed
    assert "no wandb key: logging locally" in printed
    import train
    config = {line.split(" = ")[0]: line.split(" = ", 1)[1] for line in printed.splitlines() if " = " in line}
    # the configuration, one name = value a line, as the handout says
    assert list(config) == list(train.FLAGS)
    assert (config["lora_rank"], config["lora_alpha"], config["out_dir"]) == ("8", "32.0", repr(str(out)))
    assert f"checkpoints: {out / 'ckpt.pt'} (best), {out / 'ckpt_last.pt'} (last)" in printed
    assert "validation:" in captured.err  # validation shows its progress
    base = apply_method(GPT.from_pretrained(str(hf_gpt2_dir), dict(lora_rank=8, lora_alpha=32.0)))
    for name, keys, copies in (("ckpt.pt", EVALUATION_KEYS, 1), ("ckpt_last.pt", RESUME_KEYS, 3)):
        ckpt = load_checkpoint(out / name)
        # the best for evaluation; the last also to resume from (AdamW, random state)
        assert set(ckpt) == keys
        assert set(ckpt["model"]) == LORA_NAMES
        assert ckpt["base"] == dict(init_from=str(hf_gpt2_dir), fingerprint=base_fingerprint(base))
        assert ckpt["model_args"]["lora_rank"] == 8 and ckpt["config"]["lora_alpha"] == 32.0
        # the file is the adapters' bytes (6 x 2 x 8 x 64 float32), for ckpt_last.pt with their two AdamW
        # moments, plus a small overhead
        assert tensor_bytes(ckpt["model"]) == 24_576
        assert 0 < (out / name).stat().st_size - copies * 24_576 < 24_000
        model = load_model(ckpt)
        for key, value in model.state_dict().items():  # the base comes back from init_from, exactly
            expected = ckpt["model"][key] if key in LORA_NAMES else base.state_dict()[key]
            assert torch.equal(value, expected), key
    last = load_checkpoint(out / "ckpt_last.pt")
    assert last["iter_num"] == 4 and all(t.any() for k, t in last["model"].items() if k.endswith("lora_B"))
    assert (len(last["optimizer"]["state"]) == 12
            and [set(r) for r in last["rng"]] == [{"cpu", "cuda"}])  # one process
    rows = metrics(out)
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 2, 4]
    assert all(r["val_time"] > 0 for r in rows if "val_loss" in r)
    assert [r["iter"] for r in rows if "train_loss" in r] == [1, 2, 3, 4]
    assert last["best_val_loss"] == min(r["val_loss"] for r in rows if "val_loss" in r)
    best = load_checkpoint(out / "ckpt.pt")
    assert best["best_val_loss"] == last["best_val_loss"]


def test_ckpt_last_of_an_unfinished_run_is_its_latest_evaluated_state(hf_gpt2_dir, small_data_dir, tmp_path,
                                                                       monkeypatch):
    import train
    real, calls = train.validation_loss, []

    def stop_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("stopped")
        return real(*args, **kwargs)
    monkeypatch.setattr(train, "validation_loss", stop_at_the_third)
    out = tmp_path / "lora"
    with pytest.raises(RuntimeError, match="stopped"):
        run_train(f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={out}", "max_iters=4",
                  "rank=8")
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt", "ckpt_last.pt", "metrics.jsonl"]
    resume = load_checkpoint(out / "ckpt_last.pt")
    assert resume["iter_num"] == 2 and set(resume) == RESUME_KEYS and set(resume["model"]) == LORA_NAMES
    assert len(resume["optimizer"]["state"]) == 12 and [set(r) for r in resume["rng"]] == [{"cpu", "cuda"}]
    assert resume["best_val_loss"] == load_checkpoint(out / "ckpt.pt")["best_val_loss"]


def test_full_fine_tuning_stores_every_weight_once(hf_gpt2_dir, small_data_dir, tmp_path, capsys):
    out = tmp_path / "full"
    run_train(f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={out}", "max_iters=2",
              "rank=0")
    assert "trainable parameters: 3,332,928 of 3,332,928 (100.00%)" in capsys.readouterr().out
    start = GPT.from_pretrained(str(hf_gpt2_dir)).state_dict()
    final = load_checkpoint(out / "ckpt_last.pt")
    assert set(final) == RESUME_KEYS and final["base"] is None  # self-contained
    assert set(final["model"]) == set(start) - {"lm_head.weight"}  # the tied embedding is stored once
    best = load_checkpoint(out / "ckpt.pt")
    assert set(best) == EVALUATION_KEYS and set(best["model"]) == set(final["model"])
    assert 0 < (out / "ckpt.pt").stat().st_size - tensor_bytes(best["model"]) < 40_000
    assert 0 < (out / "ckpt_last.pt").stat().st_size - 3 * tensor_bytes(final["model"]) < 80_000
    for key in ("transformer.h.0.attn.q_attn.weight", "transformer.h.1.mlp.c_fc.weight",
                "transformer.wte.weight"):
        assert not torch.equal(final["model"][key], start[key]), key
    model = load_model(final)
    assert model.lm_head.weight is model.transformer.wte.weight
    for key, value in final["model"].items():
        assert torch.equal(model.state_dict()[key], value), key
    run_train("init_from=resume", f"out_dir={out}", "max_iters=3")
    assert load_checkpoint(out / "ckpt_last.pt")["iter_num"] == 3


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
    a, b = (trainable_params(tmp_path / "a" / "ckpt_last.pt"),
            trainable_params(tmp_path / "b" / "ckpt_last.pt"))
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
    run_train(f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={out}", "max_iters=1",
              "rank=8")
    before = {p: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_train("init_from=resume", f"out_dir={out}", "rank=16", "max_iters=2")
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"train.py: error: lora_rank=16 differs from the checkpoint's lora_rank=8 in {out / 'ckpt_last.pt'}; "
        "drop the flag or use a new out_dir")
    assert {p: p.read_bytes() for p in out.iterdir()} == before


# train.py, then the count of the process group's threads still running: a group left alive at exit
# can abort the interpreter's shutdown (a worker's exit -6 in 1 to 3 runs in 100)
TRAIN_THEN_COUNT_THREADS = """import os, sys
sys.path.insert(0, {root!r})
import train
train.main(sys.argv[1:])
names = [open(f"/proc/self/task/{{task}}/comm").read() for task in os.listdir("/proc/self/task")]
sys.stdout.flush()  # then the line in one write: the two processes share the pipe
sys.stdout.write(f"process group threads left: {{sum('gloo' in name for name in names)}}\\n")
"""


def torchrun(port, out, *flags, hf_gpt2_dir, small_data_dir):
    script = out.parent / "train_then_count_threads.py"
    script.write_text(TRAIN_THEN_COUNT_THREADS.format(root=str(ROOT)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(script), f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={out}", "rank=8",
           "batch_size=4", "gradient_accumulation_steps=2", "eval_interval=2", "device=cpu", *flags]
    env = dict(os.environ, PYTHONFAULTHANDLER="1")  # a worker that aborts shows where
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-8000:]
    assert result.stdout.count("process group threads left: 0\n") == 2, result.stdout[-2000:]
    return result


def test_torchrun_two_processes_on_cpu(hf_gpt2_dir, small_data_dir, tmp_path):
    out = tmp_path / "ddp"
    result = torchrun(29517, out, "max_iters=2", "lora_dropout=0", hf_gpt2_dir=hf_gpt2_dir,
                      small_data_dir=small_data_dir)
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt", "ckpt_last.pt", "metrics.jsonl", "results.json"]
    # only rank 0 speaks and writes; it evaluates the test split alone, after the processes have parted
    assert result.stdout.count("no wandb key") == 1 and result.stdout.count("Last Iter Checkpoint ||") == 1
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [(r["checkpoint"], r["total"]) for r in rows] == [("Best Val Checkpoint", 64),
                                                             ("Last Iter Checkpoint", 64)]
    # two processes of 4 examples each take the same step as one process of 8
    run_train(f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={tmp_path / 'one'}",
              "max_iters=2", "rank=8", "batch_size=8", "gradient_accumulation_steps=1", "lora_dropout=0")
    ddp, one = trainable_params(out / "ckpt_last.pt"), trainable_params(tmp_path / "one" / "ckpt_last.pt")
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=0, atol=1e-6)


def test_torchrun_resumes_every_process_exactly_and_only_with_as_many(hf_gpt2_dir, small_data_dir, tmp_path,
                                                                      capsys):
    dropout = ("lora_dropout=0.1", "dropout=0.1", "eval_test=false")  # each process draws its own masks
    torchrun(29518, tmp_path / "straight", "max_iters=4", *dropout, hf_gpt2_dir=hf_gpt2_dir,
             small_data_dir=small_data_dir)
    torchrun(29519, tmp_path / "split", "max_iters=2", *dropout, hf_gpt2_dir=hf_gpt2_dir,
             small_data_dir=small_data_dir)
    assert len(load_checkpoint(tmp_path / "split" / "ckpt_last.pt")["rng"]) == 2
    with pytest.raises(SystemExit) as e:
        run_train("init_from=resume", f"out_dir={tmp_path / 'split'}", "max_iters=4")
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"train.py: error: {tmp_path / 'split' / 'ckpt_last.pt'} was saved by 2 processes and this is 1; "
        "resume it with the same number (torchrun --nproc_per_node=2, or 1: python train.py)\n")
    torchrun(29520, tmp_path / "split", "max_iters=4", "resume=auto", hf_gpt2_dir=hf_gpt2_dir,
             small_data_dir=small_data_dir)
    straight, split = (trainable_params(tmp_path / run / "ckpt_last.pt") for run in ("straight", "split"))
    assert all(torch.equal(value, split[key]) for key, value in straight.items())
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")


def test_wandb_offline_never_shows_the_key(hf_gpt2_dir, small_data_dir, tmp_path):
    key = "0123456789abcdef0123456789abcdef01234567"
    out = tmp_path / "wb"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_API_KEY=key, WANDB_SILENT="false",
               WANDB_DIR=str(tmp_path))
    cmd = [sys.executable, "train.py", f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}",
           f"out_dir={out}", "max_iters=2", "rank=8", "batch_size=8", "gradient_accumulation_steps=1",
           "eval_test=false", "device=cpu"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-8000:]
    assert (list((tmp_path / "wandb").glob("offline-run-*"))
            and not (out / "wandb").exists())  # wandb's own files
    assert key not in result.stdout and key not in result.stderr
    for path in [*out.iterdir(), *(tmp_path / "wandb").rglob("*")]:
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
    for name in ("ckpt.pt", "ckpt_last.pt"):
        assert key not in json.dumps(load_checkpoint(out / name)["config"])
