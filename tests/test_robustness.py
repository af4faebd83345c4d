"""Interrupted runs, write failures, unsafe checkpoints and bad input (never lose a run)."""
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

import generate
from conftest import KILLER, ROOT, files, losses, run_train, tiny_run_flags
from harness.checkpoints import CheckpointError, load_checkpoint
from harness.run import read_metrics

@pytest.mark.parametrize("target, nth, moment", [
    ("validation_loss", 1, "before the first evaluation"),
    ("atomic_write", 1, "while writing the first ckpt.pt"),
    ("atomic_write", 2, "while writing the first ckpt_last.pt"),
    ("validation_loss", 2, "after the first checkpoints, before the second evaluation"),
    ("atomic_write", 4, "while writing the second ckpt_last.pt"),
    ("validation_loss", 3, "after the second checkpoints: steps 1-2 of the killed process are kept"),
])
def test_sigkill_then_resume_matches_an_uninterrupted_run(straight_run, hf_gpt2_dir, small_data_dir, tmp_path,
                                                        target, nth, moment):
    straight = straight_run
    out = tmp_path / "killed"
    flags = tiny_run_flags(hf_gpt2_dir, small_data_dir, out)
    killed = subprocess.run([sys.executable, "-c", KILLER, target, str(nth), *flags], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    for path in out.glob("*.pt"):  # whatever was renamed into place is whole
        load_checkpoint(path)
    # a kill inside a write leaves only its temporary file behind, never a torn checkpoint
    assert len(list(out.glob(".*.tmp"))) == (1 if target == "atomic_write" else 0)

    run_train(*flags)  # the same command again
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt", "ckpt_last.pt", "metrics.jsonl"]
    expected, got = load_checkpoint(straight / "ckpt_last.pt"), load_checkpoint(out / "ckpt_last.pt")
    assert got["iter_num"] == 4
    for key, value in expected["model"].items():
        assert torch.equal(value, got["model"][key]), (moment, key)  # exact: same arithmetic, same order
    assert losses(out) == losses(straight)


def write_dataset(path, **overrides):
    path.mkdir()
    good = '{"text": "fine", "label": 1}\n{"text": "bad", "label": 0}\n'
    for split in ("train", "validation", "test"):
        content = overrides.get(split, good)
        if content is not None:
            (path / f"{split}.jsonl").write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("flags, message", [
    (["lora_rnk=4"], "unknown flag 'lora_rnk' (did you mean lora_rank?)"),
    (["max_iters=abc"], "max_iters='abc': expected an integer"),
    (["rank=-2"], "lora_rank=-2: must be >= 0"),
    (["lora_dropout=1"], "lora_dropout=1.0: must be in [0, 1)"),
    (["max_iters=0"], "max_iters=0: must be positive"),
    (["eval_interval=0"], "eval_interval=0: must be positive"),
    (["device=cuda"], "device='cuda': CUDA is not available on this machine (use device=cpu)"),
    (["resume=sometimes"], "resume='sometimes': must be off or auto"),
    ([], "out_dir={out!r} holds an earlier run; continue it with resume=auto, replace it with "
         "overwrite=true, or choose another out_dir"),
])
def test_usage_errors_leave_out_dir_untouched(finished_run, hf_gpt2_dir, small_data_dir, capsys, flags,
                                              message):
    out, before = finished_run
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_train(f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={out}", *flags)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "train.py: error: " + message.format(out=str(out))
    assert files(out) == before


@pytest.mark.parametrize("overrides, message", [
    (dict(test=None), "test split: {d}/test.jsonl does not exist"),
    (dict(validation="\n"), "validation split: {d}/validation.jsonl holds no examples"),
    (dict(train='{"text": "ok", "label": 1}\n{"text": "ok" "label": 0}\n'),
     "train split: {d}/train.jsonl:2: malformed JSON ("),
    (dict(train='{"text": "ok", "label": 3}\n'),
     "train split: {d}/train.jsonl:1: 'label' must be 0 or 1, got 3"),
    (dict(test='{"label": 1}\n'), "test split: {d}/test.jsonl:1: 'text' is missing or empty"),
    (dict(train=b'{"text": "\xff", "label": 1}\n'), "train split: {d}/train.jsonl is not UTF-8 ("),
])
def test_bad_data_names_split_and_line(finished_run, hf_gpt2_dir, tmp_path, capsys, overrides, message):
    out, before = finished_run
    data = write_dataset(tmp_path / "data", **overrides)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_train(f"init_from={hf_gpt2_dir}", f"dataset={data}", f"out_dir={out}", "overwrite=true", "rank=8")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error: " + message.format(d=data)) and "\n" not in err
    assert files(out) == before


def test_missing_dataset_directory(hf_gpt2_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_train(f"init_from={hf_gpt2_dir}", f"dataset={tmp_path}/nope", f"out_dir={tmp_path / 'o'}",
                  "rank=8")
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"train.py: error: dataset='{tmp_path}/nope': no such directory"
    assert not (tmp_path / "o").exists()


def test_out_dir_that_is_a_file_or_under_a_file(hf_gpt2_dir, small_data_dir, tmp_path, capsys):
    (tmp_path / "f").write_text("keep me")
    for out, message in ((tmp_path / "f", f"out_dir='{tmp_path}/f' is a file, not a directory"),
                         (tmp_path / "f" / "run",
                          f"out_dir='{tmp_path}/f/run' cannot be created: {tmp_path}/f is a file")):
        with pytest.raises(SystemExit) as e:
            run_train(f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={out}")
        assert e.value.code == 2
        assert capsys.readouterr().err.strip() == f"train.py: error: {message}"
    assert (tmp_path / "f").read_text() == "keep me"


class FullDisk:
    """A file that takes 100 bytes, then fails as a full disk does: torch.save's zip writer turns that
    into a RuntimeError whose cause is the OSError."""

    def __init__(self, f):
        self.f, self.written = f, 0

    def write(self, data):
        self.written += len(data)
        if self.written > 100:
            raise OSError(28, "No space left on device")
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_disk_full_while_saving_keeps_the_previous_checkpoints(finished_run, hf_gpt2_dir, small_data_dir,
                                                               capsys, monkeypatch):
    out, before = finished_run
    real_save = torch.save
    monkeypatch.setattr(torch, "save",
                        lambda obj, f, *args, **kwargs: real_save(obj, FullDisk(f), *args, **kwargs))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, out), "max_iters=6")
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        f"train.py: error: could not write {out}/ckpt.pt (No space left on device); the previous file, "
        "if any, is intact")
    after = files(out)
    for name in ("ckpt.pt", "ckpt_last.pt"):
        assert after[name] == before[name]
    assert not list(out.glob(".*.tmp"))


def test_an_out_dir_that_refuses_new_files_is_one_line_naming_the_file(finished_run, hf_gpt2_dir,
                                                                        small_data_dir, capsys, monkeypatch):
    out, before = finished_run  # as a directory made immutable (chattr +i) while a run holds it

    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, out), "max_iters=6")
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        f"train.py: error: could not write {out}/metrics.jsonl (Operation not permitted); the previous "
        "file, if any, is intact")
    assert files(out) == before


def test_nan_loss_stops_without_touching_checkpoints(finished_run, hf_gpt2_dir, small_data_dir, capsys):
    out, before = finished_run
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_train("init_from=resume", f"out_dir={out}", "max_iters=6", "lr=1e30")
    assert e.value.code == 1
    # step 5 computes its loss before its huge update; step 6 meets the wrecked weights
    assert capsys.readouterr().err.strip().endswith(
        "train.py: error: training loss is nan at iteration 6; checkpoints left as they were")
    after = files(out)
    for name in ("ckpt.pt", "ckpt_last.pt"):
        assert after[name] == before[name]


@pytest.mark.parametrize("grad_clip", ["1.0", "0"])
def test_a_gradient_norm_that_is_not_finite_stops_the_run(hf_gpt2_dir, small_data_dir, tmp_path, capsys,
                                                          grad_clip):
    # alpha / rank = 1.25e37: finite gradients whose norm is not; clipping, or AdamW's squares, would zero
    # every update
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, out), "alpha=1e38", f"grad_clip={grad_clip}")
    assert e.value.code == 1
    assert capsys.readouterr().err.strip().endswith(
        "train.py: error: the gradient norm is inf at iteration 1; checkpoints left as they were")
    assert load_checkpoint(out / "ckpt_last.pt")["iter_num"] == 0


def test_unreachable_wandb_warns_and_trains_on(hf_gpt2_dir, small_data_dir, tmp_path, capsys, monkeypatch):
    import wandb

    def unreachable(*args, **kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", unreachable)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, tmp_path / "o")[:-1], "max_iters=2")
    assert ("warning: wandb is unavailable (ConnectionError: api.wandb.ai unreachable); logging locally only"
            in capsys.readouterr().err)
    assert (tmp_path / "o" / "ckpt_last.pt").exists()


class Payload:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_checkpoint_carrying_pickled_code_is_refused(finished_run, capsys):
    out, _ = finished_run
    evil = dict(load_checkpoint(out / "ckpt.pt"), extra=Payload())
    torch.save(evil, out / "ckpt.pt")
    with pytest.raises(CheckpointError, match="needs pickled code to load; refused"):
        load_checkpoint(out / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        generate.main([f"out_dir={out}", "ckpt=best", "device=cpu"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"generate.py: error: {out}/ckpt.pt needs pickled code to load; refused (only tensors and plain "
        "data are loaded, for safety)")


def test_checkpoint_of_another_format_version_is_refused(finished_run):
    out, _ = finished_run
    torch.save(dict(load_checkpoint(out / "ckpt.pt"), version=99), out / "ckpt.pt")
    with pytest.raises(CheckpointError, match="has checkpoint format 99; this code reads format 3"):
        load_checkpoint(out / "ckpt.pt")


def test_debug_shows_the_exception(tmp_path):
    from harness.flags import UsageError
    with pytest.raises(UsageError, match="n_embd=100: must be a multiple of n_head=3"):
        run_train("init_from=scratch", f"out_dir={tmp_path / 'o'}", "n_embd=100", "n_head=3", "debug=true")
    assert not (tmp_path / "o").exists()


def test_unknown_model_name_is_one_line(tmp_path, small_data_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        run_train("init_from=gpt2-mediun", f"dataset={small_data_dir}", f"out_dir={tmp_path / 'o'}")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert err.startswith("train.py: error: init_from='gpt2-mediun': cannot load GPT-2 weights from "
                          "'gpt2-mediun': expected gpt2, gpt2-medium, gpt2-large, gpt2-xl, a GPT-2 hub id "
                          "or a local Hugging Face GPT-2 directory")
    assert not (tmp_path / "o").exists()


def test_torn_metrics_line_is_repaired_on_resume(finished_run, hf_gpt2_dir, small_data_dir):
    out, _ = finished_run
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iter": 5, "train_lo')  # a kill in the middle of a line
    assert read_metrics(out / "metrics.jsonl")[-1]["iter"] == 4  # readers skip it
    run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, out), "max_iters=6")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines[1:]]  # every line parses again
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 2, 4, 6]


def offline_cli(*args, **env):
    """A command where the Hugging Face hub is unreachable (its endpoint a closed local port)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    environ.update(HF_ENDPOINT="https://127.0.0.1:9", **env)
    return subprocess.run([sys.executable, *args, "device=cpu"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=environ)


def test_unreachable_hub_or_missing_files_fail_at_once_naming_the_flag(hf_gpt2_dir, data_dir, tmp_path):
    out = f"out_dir={tmp_path / 'o'}"
    cases = [
        (("train.py", "init_from=gpt2-medium", f"dataset={data_dir}", out),
         "train.py: error: init_from='gpt2-medium': cannot load GPT-2 weights from 'gpt2-medium' (",
         "; a local copy works too: init_from=DIR"),
        (("train.py", f"init_from={hf_gpt2_dir}", "dataset=rotten_tomatoes", out, "rank=8"),
         "train.py: error: cannot load dataset 'rotten_tomatoes' from the hub (",
         "; give a local copy instead: dataset=DIR, a directory with train.jsonl, "
         "validation.jsonl, test.jsonl"),
        # checked before the data
        (("train.py", f"init_from={tmp_path}/no/such/dir", "dataset=rotten_tomatoes", out),
         f"train.py: error: init_from='{tmp_path}/no/such/dir': no such directory", ""),
        (("generate.py", "init_from=gpt2-xl", f"dataset={data_dir}", out),
         "generate.py: error: init_from='gpt2-xl': cannot load GPT-2 weights from 'gpt2-xl' (",
         "; a local copy works too: init_from=DIR"),
    ]
    for args, start, end in cases:
        result = offline_cli(*args)
        assert result.returncode == 2 and result.stderr.startswith(start), result.stderr
        assert (result.stderr.endswith(end + "\n")
                and result.stderr.count("\n") == 1)  # no retries, no traceback
    assert not (tmp_path / "o").exists()


def test_missing_tokenizer_files_are_one_line(hf_gpt2_dir, small_data_dir, tmp_path):
    empty = tmp_path / "tiktoken_cache"
    empty.mkdir()
    result = offline_cli("train.py", f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}",
                         f"out_dir={tmp_path / 'o'}", "rank=8", TIKTOKEN_CACHE_DIR=str(empty),
                         HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    assert result.returncode == 2
    assert re.fullmatch(r"train.py: error: cannot get the GPT-2 tokenizer's files \(\w+\); "
                        r"connect to the internet once, or set TIKTOKEN_CACHE_DIR to a directory "
                        r"that holds them\n", result.stderr), result.stderr


def test_the_tests_without_data_or_hub_stop_at_once_naming_both_ways_out(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ROTTEN_TOMATOES_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")  # no cached copy, no hub
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/test_flags.py::test_three_forms_aliases_hyphens"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    assert ("ROTTEN_TOMATOES_DIR is not set and the Hugging Face hub cannot be reached: connect to the "
            f"internet once (both are then kept in {tmp_path / 'cache' / 'lora-gpt2-tests'}), "
            "or set ROTTEN_TOMATOES_DIR" in result.stdout + result.stderr)
    assert not (tmp_path / "cache" / "lora-gpt2-tests" / "rotten_tomatoes").exists()
