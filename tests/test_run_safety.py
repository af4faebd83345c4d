"""A finished run is never destroyed or mixed with another, and every bad input is one line."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from tools import export
import generate
import harness.run as harness_run
from harness.checkpoints import load_model
from harness.flags import Diverged
from generate import is_tested
import train
from harness.checkpoints import UMASK, atomic_write, load_checkpoint
from harness.run import OutDir
from conftest import KILLER, ROOT, files, last_wins, losses, run_train, save_random_hf_gpt2, tiny_run_flags


def fails_with(capsys, code, message, call, *args):
    """call(*args) exits with code and prints 'message' on stderr: all of it before training starts,
    its last line (under a closed progress bar) once training has."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        call(*args)
    err = capsys.readouterr().err
    assert e.value.code == code
    assert err == message + "\n" if code == 2 else err.endswith("\n" + message + "\n")


def test_resume_auto_never_restarts_over_a_finished_run(finished_run, hf_gpt2_dir, small_data_dir, tmp_path,
                                                        capsys):
    out, before = finished_run
    os.remove(out / "ckpt_last.pt")
    before = files(out)
    message = (f"train.py: error: out_dir={str(out)!r} holds a run but no ckpt_last.pt to continue it from; "
               "nothing was changed: replace the run with overwrite=true, or choose another out_dir")
    fails_with(capsys, 2, message, run_train, *tiny_run_flags(hf_gpt2_dir, small_data_dir, out))
    assert files(out) == before
    copy = tmp_path / "copy"  # a run copied without its ckpt_last.pt
    copy.mkdir()
    for name in ("ckpt.pt", "metrics.jsonl"):
        shutil.copy(out / name, copy / name)
    fails_with(capsys, 2, message.replace(str(out), str(copy)), run_train,
               *tiny_run_flags(hf_gpt2_dir, small_data_dir, copy))


HOLDER = r"""
import sys, time, train
real = train.validation_loss
calls = [0]
def stall(*args, **kwargs):  # hold the run open after its first checkpoints
    calls[0] += 1
    if calls[0] == 2:
        time.sleep(600)
    return real(*args, **kwargs)
train.validation_loss = stall
train.main(sys.argv[1:])
"""


def test_a_second_process_is_refused_while_a_run_holds_out_dir(straight_run, hf_gpt2_dir, small_data_dir,
                                                               tmp_path, capsys):
    out = tmp_path / "run"
    flags = tiny_run_flags(hf_gpt2_dir, small_data_dir, out)
    first = subprocess.Popen([sys.executable, "-c", HOLDER, *flags], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        def stalled():  # in its second evaluation, after steps 1 and 2: nothing changes in out_dir now
            return (out / "metrics.jsonl").exists() and '"iter": 2' in (out / "metrics.jsonl").read_text()
        while not stalled() and time.time() < deadline:
            time.sleep(0.2)
        assert stalled() and (out / "ckpt_last.pt").exists()
        before = files(out)
        holder = f"train.py (process {first.pid})"
        in_use = f"out_dir={str(out)!r} is in use by {holder}; wait for it to end or choose another out_dir"
        fails_with(capsys, 2, f"train.py: error: {in_use}", run_train, *flags)
        fails_with(capsys, 2, f"generate.py: error: {in_use}", generate.main,
                   [f"out_dir={out}", "ckpt=best", "device=cpu"])
        fails_with(capsys, 2, f"export.py: error: {in_use}", export.main,
                   [f"out_dir={out}", f"dest={tmp_path / 'x'}"])
        assert files(out) == before and not (tmp_path / "x").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    run_train(*flags)  # the kernel released the killed process's lock; the run resumes
    expected, got = load_checkpoint(straight_run / "ckpt_last.pt"), load_checkpoint(out / "ckpt_last.pt")
    for key, value in expected["model"].items():
        assert torch.equal(value, got["model"][key]), key
    assert losses(out) == losses(straight_run)  # one run's log, not two interleaved


def test_two_runs_started_together_on_a_new_out_dir_never_mix(straight_run, hf_gpt2_dir, small_data_dir,
                                                              tmp_path):
    out = tmp_path / "new" / "run"  # neither it nor its parent exists yet
    flags = tiny_run_flags(hf_gpt2_dir, small_data_dir, out)[:-1]
    first, second = (subprocess.Popen([sys.executable, "train.py", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(2))
    # read as they run: pipes never fill
    results = [(p.pid, p.communicate(timeout=300)[1]) for p in (first, second)]
    results = [(pid, p.returncode, err) for (pid, err), p in zip(results, (first, second))]
    codes = sorted(code for _, code, _ in results)
    assert codes == [0, 2], results
    (winner, _, _), = [r for r in results if r[1] == 0]
    (_, _, refused), = [r for r in results if r[1] == 2]
    # refused when it first writes: while the winner holds out_dir, or once the winner has
    # written its run there
    assert refused.endswith((
        f"train.py: error: out_dir={str(out)!r} is in use by train.py (process {winner}); wait for it to "
        "end or choose another out_dir\n",
        f"train.py: error: out_dir={str(out)!r} was taken by another process as this one started; "
        "nothing was written: choose another out_dir\n")) and refused.count("error") == 1
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt", "ckpt_last.pt", "metrics.jsonl"]
    assert losses(out) == losses(straight_run)  # one run's log, whole
    expected, got = load_checkpoint(straight_run / "ckpt_last.pt"), load_checkpoint(out / "ckpt_last.pt")
    assert all(torch.equal(value, got["model"][key]) for key, value in expected["model"].items())


def test_lock_is_released_by_a_failed_run(finished_run, capsys):
    out, _ = finished_run
    with pytest.raises(SystemExit):
        run_train("init_from=resume", f"out_dir={out}", "rank=4")  # refused after taking the lock
    with OutDir(str(out), "test"):  # free again
        pass


def test_ckpt_interval_never_saves_a_diverged_state(hf_gpt2_dir, small_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    flags = [f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={out}", "lora_rank=0",
             "learning_rate=1e30", "eval_interval=100", "ckpt_interval=1", "max_iters=4", "resume=auto"]
    fails_with(capsys, 1,
               "train.py: error: training loss is nan at iteration 2; checkpoints left as they were",
               run_train, *flags)
    resume = load_checkpoint(out / "ckpt_last.pt")  # the last good state: iteration 0, before the huge step
    assert resume["iter_num"] == 0
    start = load_checkpoint(out / "ckpt.pt")["model"]
    assert all(torch.equal(resume["model"][k], start[k]) for k in start)


def test_ckpt_interval_ckpt_last_resumes_exactly(straight_run, hf_gpt2_dir, small_data_dir, tmp_path):
    out = tmp_path / "killed"
    flags = tiny_run_flags(hf_gpt2_dir, small_data_dir, out) + ["ckpt_interval=1"]
    # the third write is ckpt_last.pt of iteration 1, saved once step 2's loss proved finite;
    # die in the fourth
    killed = subprocess.run([sys.executable, "-c", KILLER, "atomic_write", "4", *flags], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert load_checkpoint(out / "ckpt_last.pt")["iter_num"] == 1
    run_train(*flags)
    expected, got = load_checkpoint(straight_run / "ckpt_last.pt"), load_checkpoint(out / "ckpt_last.pt")
    for key, value in expected["model"].items():
        assert torch.equal(value, got["model"][key]), key
    assert losses(out) == losses(straight_run)


def test_overwrite_replaces_the_old_run_at_its_first_write(hf_gpt2_dir, small_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, out)[:-1], "eval_test=true")
    assert (out / "results.json").exists()
    old = {name: data for name, data in files(out).items() if name != ".lock"}
    old_id = load_checkpoint(out / "ckpt.pt")["run_id"]
    flags = [*tiny_run_flags(hf_gpt2_dir, small_data_dir, out)[:-1], "overwrite=true", "seed=7"]
    # the same run started again with overwrite=true, killed before its first evaluation: the old run is whole
    killed = subprocess.run([sys.executable, "-c", KILLER, "validation_loss", "1", *flags], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert {name: data for name, data in files(out).items() if name != ".lock"} == old
    # killed after its first checkpoints: only the new run's files, nothing of the old one left to mix
    killed = subprocess.run([sys.executable, "-c", KILLER, "validation_loss", "2", *flags], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt", "ckpt_last.pt", "metrics.jsonl"]
    new_ids = {load_checkpoint(out / name)["run_id"] for name in ("ckpt.pt", "ckpt_last.pt")}
    assert len(new_ids) == 1 and old_id not in new_ids
    assert load_checkpoint(out / "ckpt_last.pt")["iter_num"] == 0  # killed in its second evaluation
    header, *rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert (header == {"run_id": new_ids.pop()}
            and [r["iter"] for r in rows] == [0, 1, 2])  # the new run's log alone


def test_files_of_two_runs_are_refused_together(finished_run, hf_gpt2_dir, small_data_dir, tmp_path, capsys):
    out, _ = finished_run
    other = tmp_path / "other"
    run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, other)[:-1])
    shutil.copy(other / "ckpt_last.pt", out / "ckpt_last.pt")
    ids = [load_checkpoint(out / name)["run_id"] for name in ("ckpt.pt", "ckpt_last.pt")]
    assert ids[0] != ids[1]
    message = (f"these files belong to different runs: {out / 'ckpt.pt'} (run {ids[0]}), "
               f"{out / 'ckpt_last.pt'} (run {ids[1]})")
    fails_with(capsys, 2, f"generate.py: error: {message}", generate.main, [f"out_dir={out}", "device=cpu"])
    resume_message = (f"these files belong to different runs: {out / 'ckpt_last.pt'} (run {ids[1]}), "
                      f"{out / 'ckpt.pt'} (run {ids[0]})")
    fails_with(capsys, 2, f"train.py: error: {resume_message}", run_train, "init_from=resume",
               f"out_dir={out}", "max_iters=6")


@pytest.fixture
def evaluated_run(hf_gpt2_dir, small_data_dir, tmp_path):
    out = tmp_path / "run"
    run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, out)[:-1], "eval_test=true")
    return out


@pytest.mark.parametrize("flags", [["num_examples=5"], ["split=validation"], ["temperature=1.0"]])
def test_a_partial_evaluation_never_replaces_the_test_result(evaluated_run, flags):
    out = evaluated_run
    before = (out / "results.json").read_bytes()
    generate.main([f"out_dir={out}", "device=cpu", *flags])
    assert (out / "results.json").read_bytes() == before
    last = json.loads((out / "last_evaluation.json").read_text())
    assert last["complete"] is False and len(last["results"]) == 2


def test_one_checkpoint_or_method_replaces_only_its_own_rows(evaluated_run):
    from tools import report
    out = evaluated_run
    last_row = json.loads((out / "results.json").read_text())["results"][1]
    generate.main([f"out_dir={out}", "device=cpu", "ckpt=best", "method=logprob"])
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [(r["checkpoint"], r["method"]) for r in rows] == [
        ("Best Val Checkpoint", "generate"), ("Last Iter Checkpoint", "generate"),
        ("Best Val Checkpoint", "logprob")]
    assert rows[1] == last_row
    predictions = json.loads((out / "results.json").read_text())["predictions"]
    assert ([(p["checkpoint"], p["method"]) for p in predictions]
            == [(r["checkpoint"], r["method"]) for r in rows])
    assert report.is_finished(str(out), report.run_state(str(out)))


def test_temporary_files_are_new_and_unpredictable(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    # names an attacker might guess
    for name in (f"ckpt.pt.tmp-{os.getpid()}", f".ckpt.pt.{os.getpid()}.tmp"):
        os.symlink(victim, tmp_path / name)
    used = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace",
                        lambda src, dst: (used.append(os.path.basename(src)), real_replace(src, dst)))
    for content in (b"one", b"two"):
        atomic_write(str(tmp_path / "ckpt.pt"), lambda f: f.write(content))
    assert (tmp_path / "ckpt.pt").read_bytes() == b"two" and victim.read_text() == "keep me"
    assert len(set(used)) == 2 and all(u.startswith(".ckpt.pt.") and u.endswith(".tmp") for u in used)
    assert (tmp_path / "ckpt.pt").stat().st_mode & 0o777 == 0o666 & ~UMASK  # not mkstemp's owner-only mode


def test_the_tracked_wandb_api_json_is_the_template_with_no_key(monkeypatch):
    committed = subprocess.run(["git", "show", ":wandb_api.json"], cwd=ROOT, capture_output=True, text=True)
    assert committed.returncode == 0 and json.loads(committed.stdout) == {"wandb_api_key": ""}
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    # not one with a pasted key
    if json.loads((ROOT / "wandb_api.json").read_text()) == {"wandb_api_key": ""}:
        assert train.wandb_key() == ""  # the empty key is no key: nothing is logged to wandb


@pytest.mark.parametrize("flags, message", [
    (["out_dir="], "out_dir is empty: name a directory for the run's files"),
    (["out_dir=/sys/run"], "out_dir='/sys/run' cannot be written: /sys: "),
    (["seed=99999999999999999999"], "seed=99999999999999999999: must be in [0, 2**32)"),
    (["lora_alpha=0"], "lora_alpha=0.0: must be positive"),
    (["lora_alpha=-4"], "lora_alpha=-4.0: must be positive"),
])
def test_more_bad_flags_stop_before_loading_anything(flags, message, tmp_path, capsys, monkeypatch):
    import model
    monkeypatch.setattr(model.GPT, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as e:
        run_train(f"out_dir={tmp_path / 'out'}", *flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"train.py: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_context_too_small_for_the_prompt_stops_before_training(small_data_dir, tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.setattr(train, "forward_backward", lambda *a, **k: pytest.fail("trained"))
    fails_with(capsys, 2, "train.py: error: the 'default' prompt needs 23 tokens and its answer 5 more: "
               "more than the 24-token context of init_from=scratch (raise block_size)", run_train,
               "init_from=scratch", "block_size=24", f"dataset={small_data_dir}", f"out_dir={tmp_path / 'o'}",
               "eval_test=true")
    assert not (tmp_path / "o").exists()


def test_max_new_tokens_beyond_the_context_is_one_clear_line(finished_run, capsys):
    out, _ = finished_run
    fails_with(capsys, 2, "generate.py: error: the 'default' prompt needs 23 tokens and its answer 100000 "
               "more: more than the 256-token context of the model", generate.main,
               [f"out_dir={out}", "ckpt=best", "device=cpu", "max_new_tokens=100000"])


def test_an_explicit_init_from_on_resume_must_be_the_runs_base(finished_run, hf_gpt2_dir, small_data_dir,
                                                               tmp_path, capsys):
    out, before = finished_run
    other = tmp_path / "other"
    save_random_hf_gpt2(other, seed=1)
    ckpt = load_checkpoint(out / "ckpt_last.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_train(*tiny_run_flags(other, small_data_dir, out), "max_iters=6")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(
        f"train.py: error: the adapter was trained on {hf_gpt2_dir} "
        f"(weights {ckpt['base']['fingerprint']}), not on {other}")
    assert files(out) == before
    full = tmp_path / "full"
    run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, full)[:-1], "rank=0", "max_iters=2")
    full_flags = [f for f in tiny_run_flags(other, small_data_dir, full) if not f.startswith("rank=")]
    fails_with(capsys, 2, f"train.py: error: init_from={str(other)!r} differs from the resumed run's "
               f"init_from={str(hf_gpt2_dir)!r}, and that run trains every weight, so it continues from its "
               "own; drop the flag or use a new out_dir", run_train, *full_flags, "max_iters=3")


def edited_checkpoint(path, edit):
    checkpoint = load_checkpoint(path)
    edit(checkpoint)
    torch.save(checkpoint, path)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b""), "{p} is corrupt or truncated (an empty file)"),
    (lambda p: p.write_bytes(os.urandom(4096)), "{p} is corrupt or truncated ("),
    (lambda p: edited_checkpoint(p, lambda c: c.pop("model")), "{p} is incomplete: it lacks model"),
    (lambda p: edited_checkpoint(p, lambda c: c["model_args"].update(n_embd=128)),
     "the checkpoint's transformer.h.0.attn.q_attn.lora_A has shape (8, 64), the model's (8, 128): its "
     "tensors and model_args disagree"),
    # checked before allocating
    (lambda p: edited_checkpoint(p, lambda c: c["model_args"].update(vocab_size=10**13)),
     "the checkpoint's model_args have vocab_size=10000000000000, its base model vocab_size=50257"),
    (lambda p: edited_checkpoint(p, lambda c: c["model"].update(
        {"transformer.h.0.attn.q_attn.lora_A": torch.zeros(4, 64)})),
     "the checkpoint's transformer.h.0.attn.q_attn.lora_A has shape (4, 64), the model's (8, 64): its "
     "tensors and model_args disagree"),
    (lambda p: edited_checkpoint(p, lambda c: c["model_args"].update(flash=True)),
     "the checkpoint's model_args are not this model's settings ("),
])
def test_damaged_checkpoints_are_one_line(finished_run, capsys, damage, message):
    out, _ = finished_run
    damage(out / "ckpt.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        generate.main([f"out_dir={out}", "ckpt=best", "device=cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("generate.py: error: " + message.format(p=out / "ckpt.pt"))
    assert err.count("\n") == 1 and "pickled code" not in err and "weights_only" not in err


def test_an_empty_ckpt_last_pt_is_one_line(finished_run, hf_gpt2_dir, small_data_dir, capsys):
    out, _ = finished_run
    (out / "ckpt_last.pt").write_bytes(b"")
    fails_with(capsys, 2, f"train.py: error: {out / 'ckpt_last.pt'} is corrupt or truncated (an empty file)",
               run_train, *tiny_run_flags(hf_gpt2_dir, small_data_dir, out), "max_iters=6")


def test_metrics_lines_that_are_not_rows_do_not_stop_a_resume(finished_run, hf_gpt2_dir, small_data_dir):
    out, _ = finished_run
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[3:3] = ['{"note": "no iter here"}', "not json at all", "[1, 2]"]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, out), "max_iters=6")
    header, *rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert header == {"run_id": load_checkpoint(out / "ckpt.pt")["run_id"]}
    assert all(isinstance(r.get("iter"), int) for r in rows)
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 2, 4, 6]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weights_that_are_not_finite_are_never_saved(finished_run, tmp_path, bad):
    out, _ = finished_run
    model = load_model(load_checkpoint(out / "ckpt_last.pt"))
    run = harness_run.TrainingRun(str(tmp_path / "new"), "test")
    run.config, run.resume, run.run_id = (SimpleNamespace(**load_checkpoint(out / "ckpt.pt")["config"]),
                                          None, "test")
    run.config.out_dir = str(tmp_path / "new")
    run.save("ckpt.pt", model, 4, 1.0)
    saved = (tmp_path / "new" / "ckpt.pt").read_bytes()
    with torch.no_grad():
        model.transformer.h[1].attn.v_attn.lora_B[3, 2] = bad
    with pytest.raises(Diverged,
                       match="^the weights are not finite at iteration 5; checkpoints left as they were$"):
        run.save("ckpt.pt", model, 5, 1.0)
    assert (tmp_path / "new" / "ckpt.pt").read_bytes() == saved
    run.close()


def test_a_finished_run_is_left_alone_and_never_resumed_backwards(evaluated_run, hf_gpt2_dir, small_data_dir,
                                                                  capsys):
    out = evaluated_run
    before = {name: data for name, data in files(out).items() if name != ".lock"}
    for asked, flags in ((2, ["init_from=resume", f"out_dir={out}"]),
                         (3, tiny_run_flags(hf_gpt2_dir, small_data_dir, out))):
        fails_with(capsys, 2, f"train.py: error: out_dir={str(out)!r} holds a run at iteration 4, past "
                   f"max_iters={asked}; nothing was changed: give max_iters=4 or more to continue it",
                   run_train, *flags, f"max_iters={asked}")
    fails_with(capsys, 2, "train.py: error: overwrite=true contradicts resume=auto and init_from=resume: "
               "give one of them",
               run_train, *tiny_run_flags(hf_gpt2_dir, small_data_dir, out), "overwrite=true")
    run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, out), "eval_test=true")  # the same command again
    printed = capsys.readouterr().out
    assert (f"{out} holds this run finished at iteration 4: nothing to train\n" in printed
            and "Accuracy" not in printed)
    run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, out), "lr=5e-3", "grad_clip=0.5")
    assert (f"{out} holds this run finished at iteration 4: nothing to train; grad_clip=0.5, "
            "learning_rate=0.005 changed nothing (a larger max_iters continues the run; another out_dir starts "
            "a new one)\n" in capsys.readouterr().out)
    assert {name: data for name, data in files(out).items() if name != ".lock"} == before


def test_extending_a_run_keeps_no_result_of_its_earlier_checkpoints(evaluated_run, hf_gpt2_dir,
                                                                    small_data_dir):
    from tools import report
    out = evaluated_run
    generate.main([f"out_dir={out}", "device=cpu", "method=logprob"])
    assert report.is_finished(str(out), load_checkpoint(out / "ckpt_last.pt"))
    run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, out), "max_iters=6", "eval_test=true")
    results = json.loads((out / "results.json").read_text())["results"]
    at = {"Best Val Checkpoint": load_checkpoint(out / "ckpt.pt")["iter_num"], "Last Iter Checkpoint": 6}
    assert {(r["checkpoint"], r["method"]) for r in results} >= {(name, "generate") for name in at}
    # none describes iteration 4's state
    assert all(r["iter_num"] == at[r["checkpoint"]] for r in results), results
    predictions = json.loads((out / "results.json").read_text())["predictions"]
    assert ([(p["checkpoint"], p["method"]) for p in predictions]
            == [(r["checkpoint"], r["method"]) for r in results])
    last = load_checkpoint(out / "ckpt_last.pt")
    assert report.is_finished(str(out), last)
    # as an extension killed early
    torch.save(dict(last, config=dict(last["config"], max_iters=8)), out / "ckpt_last.pt")
    assert not report.is_finished(str(out), load_checkpoint(out / "ckpt_last.pt"))


@pytest.mark.parametrize("flags, message", [
    (["rank=1000000000000"], "lora_rank=1000000000000: must be at most 64, the width of {base}'s layers"),
    (["batch_size=100000000000", "gradient_accumulation_steps=1"],
     "batch_size x gradient_accumulation_steps = 100000000000 reviews a step: more than the 300 of the "
     "train split"),
    (["dataset= "], "dataset is empty: name a hub dataset or a local directory"),
])
def test_sizes_that_cannot_fit_are_one_line_before_anything_is_allocated(hf_gpt2_dir, small_data_dir,
                                                                         tmp_path, capsys, flags, message):
    out = tmp_path / "o"
    fails_with(capsys, 2, "train.py: error: " + message.format(base=hf_gpt2_dir), run_train,
               *tiny_run_flags(hf_gpt2_dir, small_data_dir, out), *flags)
    assert not out.exists()


def test_a_configured_wandb_key_is_printed_and_saved_as_in_effect(finished_run, hf_gpt2_dir, small_data_dir,
                                                                    capsys, monkeypatch):
    out, _ = finished_run
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    # the key is in effect; no wandb run is made here
    monkeypatch.setattr(train, "start_wandb", lambda config: None)
    run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, out)[:-1], "overwrite=true", "max_iters=2")
    assert "wandb_log = True" in capsys.readouterr().out.splitlines()
    assert load_checkpoint(out / "ckpt.pt")["config"]["wandb_log"] is True


def test_results_are_written_whole_with_their_answers(evaluated_run, capsys, monkeypatch):
    out = evaluated_run
    before = (out / "results.json").read_bytes()
    (out / "results.json").unlink()
    (out / "results.json").mkdir()  # it cannot be replaced: one line, and nothing else is written
    with pytest.raises(SystemExit) as e:
        generate.main([f"out_dir={out}", "device=cpu", "ckpt=last", "method=logprob"])
    err = capsys.readouterr().err
    assert (e.value.code == 2
            and err.endswith(f"\rgenerate.py: error: could not write {out}/results.json (Is a directory); "
                             "the previous file, if any, is intact\n")
            and "Traceback" not in err)
    assert not (out / "last_evaluation.json").exists() and not list(out.glob(".*.tmp"))
    (out / "results.json").rmdir()
    (out / "results.json").write_bytes(before)
    real_replace = os.replace

    def killed_at_the_rename(src, dst):
        raise KeyboardInterrupt  # as a kill just before the new file replaces the old
    monkeypatch.setattr(os, "replace", killed_at_the_rename)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # Ctrl-C: one line, exit status 130
        generate.main([f"out_dir={out}", "device=cpu", "ckpt=last", "method=logprob"])
    err = capsys.readouterr().err
    assert e.value.code == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == ("generate.py: error: interrupted; every file is whole (train.py continues "
                                    "with resume=auto)")
    monkeypatch.setattr(os, "replace", real_replace)
    assert (out / "results.json").read_bytes() == before
    generate.main([f"out_dir={out}", "device=cpu", "ckpt=last", "method=logprob"])
    results = json.loads((out / "results.json").read_text())
    assert [(r["checkpoint"], r["method"]) for r in results["results"]] == [
        (p["checkpoint"], p["method"]) for p in results["predictions"]]
    assert ("Last Iter Checkpoint", "logprob") in [(p["checkpoint"], p["method"])
                                                   for p in results["predictions"]]
    for row, answers in zip(results["results"], results["predictions"]):  # every number is its answers'
        assert (generate.summarize(answers["records"])
                == {k: row[k] for k in generate.summarize(answers["records"])})
    assert not list(out.glob(".*.tmp"))


def test_a_run_killed_at_iteration_0_and_evaluated_restarts(hf_gpt2_dir, small_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    flags = tiny_run_flags(hf_gpt2_dir, small_data_dir, out)
    # killed writing its first ckpt_last.pt
    killed = subprocess.run([sys.executable, "-c", KILLER, "atomic_write", "2", *flags], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9 and load_checkpoint(out / "ckpt.pt")["iter_num"] == 0
    export.main([f"out_dir={out}", f"dest={tmp_path / 'adapter'}"])
    assert "(iteration 0)" in capsys.readouterr().out  # says which state it exported
    generate.main([f"out_dir={out}", "ckpt=best", "device=cpu"])
    assert (out / "results.json").exists()
    run_train(*flags)  # resume=auto: nothing of value to lose, so it starts the run
    assert load_checkpoint(out / "ckpt_last.pt")["iter_num"] == 4 and not (out / "results.json").exists()


def edited_rows(path, edit):
    evaluation = json.loads(path.read_text())
    for row in evaluation["results"]:
        edit(row)
    path.write_text(json.dumps(evaluation))


@pytest.mark.parametrize("damage", [
    lambda out: (out / "results.json").write_text("[1]"),
    lambda out: (out / "results.json").write_text(
        '{"run_id": "x", "results": [{"checkpoint": "Best Val Checkpoint"}]}'),
    lambda out: edited_rows(out / "results.json", lambda row: row.pop("iter_num")),
    lambda out: edited_rows(out / "results.json", lambda row: row.update(settings=None)),
    lambda out: (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text()
                                                   + '{"iter": 1, "elapsed": "x"}\n'),
    lambda out: (out / "metrics.jsonl").write_bytes((out / "metrics.jsonl").read_bytes() + b"\xff\n"),
])
def test_damaged_results_and_metrics_are_replaced_not_read(evaluated_run, hf_gpt2_dir, small_data_dir,
                                                           damage):
    out = evaluated_run
    damage(out)
    run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, out), "max_iters=6", "eval_test=true")
    assert is_tested(str(out)) and losses(out)[-1]["iter"] == 6
    generate.main([f"out_dir={out}", "device=cpu", "ckpt=best"])


def test_evaluations_that_are_not_the_runs_own_never_replace_its_results(evaluated_run, tmp_path):
    out = evaluated_run
    before = {"results.json": (out / "results.json").read_bytes()}
    other = tmp_path / "other_data"
    other.mkdir()
    for split in ("train", "validation", "test"):
        (other / f"{split}.jsonl").write_text('{"text": "fine", "label": 1}\n{"text": "bad", "label": 0}\n')
    for flags in ([f"dataset={other}"], ["max_new_tokens=1"], ["prompt_template=question"]):
        generate.main([f"out_dir={out}", "device=cpu", *flags])
        assert {name: (out / name).read_bytes() for name in before} == before, flags
        assert json.loads((out / "last_evaluation.json").read_text())["complete"] is False


def test_a_new_run_never_deletes_an_evaluation_in_its_out_dir(hf_gpt2_dir, small_data_dir, tmp_path, capsys):
    out = tmp_path / "zero"
    generate.main([f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={out}",
                   "num_examples=5", "device=cpu"])
    kept = files(out)
    for resume in ("off", "auto"):
        with pytest.raises(SystemExit) as e:
            run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, out), f"resume={resume}")
        assert e.value.code == 2 and "holds" in capsys.readouterr().err
    assert ({k: v for k, v in files(out).items() if k != ".lock"}
            == {k: v for k, v in kept.items() if k != ".lock"})


def test_metrics_of_another_run_are_refused(finished_run, hf_gpt2_dir, small_data_dir, tmp_path, capsys):
    out, _ = finished_run
    other = tmp_path / "other"
    run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, other)[:-1], "seed=7")
    shutil.copy(other / "metrics.jsonl", out / "metrics.jsonl")
    before = files(out)
    fails_with(capsys, 2, f"train.py: error: {out / 'metrics.jsonl'} holds rows of another run than "
               f"{out / 'ckpt_last.pt'}'s ({load_checkpoint(out / 'ckpt_last.pt')['run_id']}); "
               "nothing was changed",
               run_train, *tiny_run_flags(hf_gpt2_dir, small_data_dir, out), "max_iters=6")
    assert files(out) == before


@pytest.mark.parametrize("device", ["meta", "xpu", "ipu"])
def test_devices_this_code_does_not_run_on_are_one_line(finished_run, device, capsys):
    out, _ = finished_run
    fails_with(capsys, 2, f"generate.py: error: device={device!r}: expected auto, cpu, cuda, cuda:N or mps",
               generate.main, [f"out_dir={out}", f"device={device}", "text=hi"])


@pytest.mark.parametrize("make", [lambda p, victim: p.symlink_to(victim), lambda p, victim: os.mkfifo(p),
                                  lambda p, victim: p.mkdir()])
def test_a_lock_file_that_is_not_a_plain_file_is_refused_and_nothing_outside_is_written(
        finished_run, tmp_path, capsys, make):
    out, _ = finished_run
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / ".lock").unlink()
    make(out / ".lock", victim)
    with pytest.raises(SystemExit) as e:
        generate.main([f"out_dir={out}", "ckpt=best", "device=cpu", "text=fine"])
    err = capsys.readouterr().err
    assert (e.value.code == 2 and err.startswith(f"generate.py: error: {out / '.lock'} ")
            and err.endswith("remove it\n"))
    assert victim.read_text() == "precious"


def test_torchrun_variables_alone_do_not_make_a_worker(finished_run, hf_gpt2_dir, small_data_dir, capsys,
                                                       monkeypatch):
    out, _ = finished_run
    monkeypatch.setenv("RANK", "1")  # without WORLD_SIZE > 1 this is a process of its own: it takes the lock
    with OutDir(str(out), "test"):
        fails_with(capsys, 2, f"train.py: error: out_dir={str(out)!r} is in use by test "
                   f"(process {os.getpid()}); wait for it to end or choose another out_dir",
                   run_train, *tiny_run_flags(hf_gpt2_dir, small_data_dir, out))
    monkeypatch.setenv("WORLD_SIZE", "two")
    fails_with(capsys, 2, "train.py: error: WORLD_SIZE='two', RANK='1' and LOCAL_RANK=None: expected whole "
               "numbers, as torchrun sets them", run_train, *tiny_run_flags(hf_gpt2_dir, small_data_dir, out))


def test_a_damaged_best_checkpoint_is_found_before_resuming(finished_run, hf_gpt2_dir, small_data_dir,
                                                            capsys):
    out, _ = finished_run
    (out / "ckpt.pt").write_bytes(b"")
    before = files(out)
    fails_with(capsys, 2, f"train.py: error: {out / 'ckpt.pt'} is corrupt or truncated (an empty file)",
               run_train, *tiny_run_flags(hf_gpt2_dir, small_data_dir, out), "max_iters=6")
    assert files(out) == before


def test_an_out_dir_that_is_a_dangling_link_is_one_line(hf_gpt2_dir, small_data_dir, tmp_path, capsys):
    out = tmp_path / "link"
    out.symlink_to(tmp_path / "gone")
    fails_with(capsys, 2, f"train.py: error: out_dir={str(out)!r} is a symbolic link to "
               f"{str(tmp_path / 'gone')!r}, which does not exist", run_train,
               *tiny_run_flags(hf_gpt2_dir, small_data_dir, out))
    assert not (tmp_path / "gone").exists()


def test_a_run_resumes_only_on_its_own_data_and_every_tool_follows_it_when_moved(hf_gpt2_dir, small_data_dir,
                                                                                  tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(small_data_dir, data)
    run_train(*tiny_run_flags(hf_gpt2_dir, data, out)[:-1], "max_iters=2")
    other = tmp_path / "other_data"  # other reviews
    other.mkdir()
    for split in ("train", "validation", "test"):
        (other / f"{split}.jsonl").write_text(
            '{"text": "fine", "label": 1}\n{"text": "bad", "label": 0}\n' * 10)
    before = files(out)
    fails_with(capsys, 2, f"train.py: error: dataset={str(other)!r} holds other reviews than the run "
               "trained on; resume it on its own data, or start a new run in another out_dir", run_train,
               "init_from=resume", f"out_dir={out}", f"dataset={other}", "max_iters=4")
    assert files(out) == before
    moved = tmp_path / "moved"
    os.rename(data, moved)  # the same reviews in another place: the run goes on, and names the new place
    run_train("init_from=resume", f"out_dir={out}", f"dataset={moved}", "max_iters=4", "eval_test=true")
    assert load_checkpoint(out / "ckpt_last.pt")["config"]["dataset"] == str(moved)
    generate.main([f"out_dir={out}", "ckpt=best", "device=cpu", "method=logprob"])  # no dataset= needed
    results = json.loads((out / "results.json").read_text())
    assert ({r["settings"]["dataset"] for r in results["results"]} == {str(moved)}
            and len(results["results"]) == 3)
    assert is_tested(str(out))

def test_an_extension_killed_between_its_writes_continues_only_to_its_end(finished_run, hf_gpt2_dir,
                                                                          small_data_dir, capsys):
    out, _ = finished_run
    flags = tiny_run_flags(hf_gpt2_dir, small_data_dir, out)
    # killed writing ckpt_last.pt at iteration 6
    killed = subprocess.run([sys.executable, "-c", KILLER, "atomic_write", "2",
                             *last_wins(*flags, "max_iters=8")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9 and load_checkpoint(out / "ckpt.pt")["iter_num"] == 6
    assert load_checkpoint(out / "ckpt_last.pt")["iter_num"] == 4
    fails_with(capsys, 2, f"train.py: error: {out / 'ckpt.pt'} is at iteration 6, past "
               f"{out / 'ckpt_last.pt'}'s 4: an extension to max_iters=8 was interrupted; continue it with "
               "that max_iters", run_train, *flags)
    run_train(*flags, "max_iters=8")
    assert load_checkpoint(out / "ckpt_last.pt")["iter_num"] == 8


def test_results_whose_answers_do_not_match_their_rows_are_not_a_result(evaluated_run):
    out = evaluated_run
    results = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps(dict(results, predictions=results["predictions"][:1])))
    assert not is_tested(str(out))
    generate.main([f"out_dir={out}", "device=cpu", "ckpt=last", "method=logprob"])
    results = json.loads((out / "results.json").read_text())  # the damaged rows are gone, not kept
    assert ([(r["checkpoint"], r["method"]) for r in results["results"]]
            == [("Last Iter Checkpoint", "logprob")])
    assert len(results["predictions"]) == 1


def test_classifying_with_a_raw_gpt2_needs_no_out_dir(hf_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "held"
    out.mkdir()
    with OutDir(str(out), "train.py"):
        generate.main([f"init_from={hf_gpt2_dir}", f"out_dir={out}", "device=cpu", "text=a fine film"])
    assert capsys.readouterr().out.rstrip().endswith("a fine film")
