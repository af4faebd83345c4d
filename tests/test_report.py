import json
import os
import shutil
import statistics
import subprocess
import sys
import zipfile

import matplotlib.image
import pytest
import nbformat
from nbclient import NotebookClient

import train
from conftest import KILLER, ROOT, last_wins, save_random_hf_gpt2
from harness.checkpoints import load_checkpoint
from harness.flags import parse_flags
from harness.run import read_metrics
from tools import prompting, report

TINY = "batch_size=8 gradient_accumulation_steps=2 eval_interval=1"


def run_report(results, hf_dir, data_dir, *flags):
    cmd = [sys.executable, "-m", "tools.report", f"results_dir={results}", f"init_from={hf_dir}",
           f"dataset={data_dir}", "device=cpu", "max_iters=2", f"extra={TINY}", "shots=", *flags]
    result = subprocess.run(last_wins(*cmd), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def table_rows(markdown, label):
    return [line for line in markdown.splitlines() if line.startswith(f"| {label} |")]


def test_report_runs_skips_and_resumes(hf_gpt2_dir, small_data_dir, tmp_path):
    results = tmp_path / "results"
    # the full run as report.py starts it, killed at its second evaluation (after iteration 1)
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, "validation_loss", "2", *report.RUNS["full"][1].split(),
         f"out_dir={results / 'full'}", "resume=auto", "eval_test=true", f"init_from={hf_gpt2_dir}",
         f"dataset={small_data_dir}", "device=cpu", *TINY.split(), "max_iters=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]

    prompting = ("shots=0,2", "shot_seeds=2")
    out = run_report(results, hf_gpt2_dir, small_data_dir, "runs=r16_a64,full", *prompting)
    assert f"resuming {results / 'full'} at iteration 0 of 2" in out
    markdown = (results / "results.md").read_text()
    for run in ("r16_a64", "full"):
        saved = json.loads((results / run / "results.json").read_text())["results"]
        best = next(r for r in saved if r["checkpoint"] == "Best Val Checkpoint")
        last = next(r for r in saved if r["checkpoint"] == "Last Iter Checkpoint")
        rows = table_rows(markdown, report.LABELS[run])
        assert len(rows) == 3  # the ranks', the alpha's and the methods' tables
        cells = [c.strip() for c in rows[0].strip("|").split("|")]
        assert cells[3:6] == [f"{best['accuracy']:.4f}", f"{last['accuracy']:.4f}",
                              f"{best['unparseable']} / {last['unparseable']}"]
        assert cells[6] == ("12,288 of 3,345,216 (0.37%)" if run == "r16_a64"
                            else "3,332,928 of 3,332,928 (100.00%)")
        assert cells[7] == "2" and cells[9] == "cpu"
    assert table_rows(markdown, report.LABELS["r196_a784"]) == [
        f"| {report.LABELS['r196_a784']} | not run yet | | | | | | | | |"]
    zero = json.loads((results / "zero_shot" / "results.json").read_text())["results"][0]
    assert f"| {hf_gpt2_dir} | {zero['accuracy']:.4f} | {zero['unparseable']} | cpu |" in markdown
    full_metrics = read_metrics(results / "full" / "metrics.jsonl")
    assert [r["iter"] for r in full_metrics if "val_loss" in r] == [0, 1, 2]
    assert [r["iter"] for r in full_metrics if "train_loss" in r] == [1, 2]  # resumed, not restarted twice

    for name, runs in (("zero-shot", ["k0_seed0"]), ("2-shot", ["k2_seed0", "k2_seed1"])):
        for calibrated in (False, True):
            accuracies = []
            for run in runs:  # one evaluation each: the logprob row, and the calibrated one beside it
                path = results / "prompting" / run / "last_evaluation.json"
                saved = json.loads(path.read_text())["results"]
                assert [(r["method"], r["parse"]) for r in saved] == [("logprob", None), ("logprob", "calibrated")]
                accuracies.append(saved[calibrated]["accuracy"])
            shown = (f"{statistics.mean(accuracies):.4f} ± {statistics.stdev(accuracies):.4f}"
                     if len(runs) > 1 else f"{accuracies[0]:.4f}")
            label = name + (", calibrated" if calibrated else "")
            assert table_rows(markdown, label) == [f"| {label} | {shown} | {len(runs)} of {len(runs)} |"]
    best = json.loads((results / "r16_a64" / "results.json").read_text())["results"][0]["accuracy"]
    assert table_rows(markdown, report.LABELS["r16_a64"] + " (fine-tuned)") == [
        f"| {report.LABELS['r16_a64']} (fine-tuned) | {best:.4f} | 1 |"]

    stamps = {p: p.stat().st_mtime_ns for p in results.rglob("*.pt")}
    again = run_report(results, hf_gpt2_dir, small_data_dir, "runs=r16_a64,full", *prompting)
    assert ("zero-shot: done already" in again and "r16_a64: done already" in again
            and "full: done already" in again and "prompting k2_seed1: done already" in again)
    assert "train.py" not in again and "generate.py" not in again
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*.pt")} == stamps

    plotted = json.loads((results / "val_loss.json").read_text())
    for run in ("r16_a64", "full"):
        metrics = read_metrics(results / run / "metrics.jsonl")
        assert plotted["val_loss.png"][report.LABELS[run]] == [[r["iter"], r["val_loss"]]
                                                               for r in metrics if "val_loss" in r]
    assert set(plotted["val_loss_alpha.png"]) == {report.LABELS["r16_a64"], report.LABELS["full"]}
    for name in ("val_loss.png", "val_loss_alpha.png"):
        image = matplotlib.image.imread(results / name)
        assert image.shape[:2] == (500, 800) and image.std() > 0


@pytest.mark.parametrize("extra, message", [
    ('lr="1e-3', "extra='lr=\"1e-3': No closing quotation"),
    ("foo=1", "extra='foo=1': unknown flag 'foo' (-h lists the flags)"),
    ("lr=fast", "extra='lr=fast': learning_rate='fast': expected a number"),
    ("out_dir=/elsewhere resume=off",
     "extra='out_dir=/elsewhere resume=off': out_dir, resume: report.py or the grid's runs set these "
     "(results_dir=, runs=, init_from=, dataset=, device=, max_iters=)"),
    ("eval_test=false", "extra='eval_test=false': eval_test: report.py or the grid's runs set these "
                        "(results_dir=, runs=, init_from=, dataset=, device=, max_iters=)"),
    ("--lora-rank 8", "extra='--lora-rank 8': lora_rank: report.py or the grid's runs set these "
                      "(results_dir=, runs=, init_from=, dataset=, device=, max_iters=)"),
])
def test_bad_extra_flags_are_one_line(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        report.main([f"results_dir={tmp_path}", "zero_shot=false", f"extra={extra}"])
    assert (e.value.code, capsys.readouterr().err) == (2, f"report.py: error: {message}\n")
    assert os.listdir(tmp_path) == []


def test_extra_takes_train_py_flags_in_every_form(tmp_path):
    config, _ = parse_flags("report.py", report.FLAGS, [f"results_dir={tmp_path}", "extra=--lr 1e-3 --compile"])
    argv = report.train_argv(config, "r16_a64")
    assert "learning_rate=0.001" in argv and "compile=True" in argv and "lora_rank=16" in argv


@pytest.mark.parametrize("flags, message", [
    (["init_from={tmp}/missing"], "init_from='{tmp}/missing': no such directory"),
    (["device=cuda"], "device='cuda': CUDA is not available on this machine (use device=cpu)"),
    (["results_dir={tmp}/file/results"], "results_dir='{tmp}/file/results' cannot be created: {tmp}/file is a file"),
    (["runs=r16_a64,r128_a512"], "runs=r128_a512: lora_rank=128 is more than the 64-wide layers of {hf}; choose "
                                 "other runs or another init_from"),
])
def test_what_the_flags_tell_stops_report_before_its_first_command(hf_gpt2_dir, small_data_dir, tmp_path, capsys,
                                                                   flags, message):
    (tmp_path / "file").write_text("")
    argv = [f"results_dir={tmp_path / 'results'}", f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}",
            "device=cpu", "shots="]
    with pytest.raises(SystemExit) as e:
        report.main(last_wins(*argv, *(f.format(tmp=tmp_path) for f in flags)))
    assert (e.value.code, capsys.readouterr().err) == (
        2, f"report.py: error: {message.format(tmp=tmp_path, hf=hf_gpt2_dir)}\n")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_a_command_that_refuses_is_passed_on_as_its_one_line(hf_gpt2_dir, small_data_dir, tmp_path):
    (tmp_path / "r16_a64").write_text("not a run")  # train.py refuses such an out_dir
    cmd = [sys.executable, "-m", "tools.report", f"results_dir={tmp_path}", f"init_from={hf_gpt2_dir}",
           f"dataset={small_data_dir}", "device=cpu", "runs=r16_a64", "zero_shot=false", "shots="]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (2, f"train.py: error: out_dir={str(tmp_path / 'r16_a64')!r} is "
                                                     "a file, not a directory\n")


def test_unknown_run_is_a_usage_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.report", "runs=r16_a64,r99",
                             f"results_dir={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("report.py: error: runs='r16_a64,r99': expected all, methods or a "
                                    "comma-separated list of r16_a64")
    assert os.listdir(tmp_path) == []


def notebook(**parameters):
    nb = nbformat.read(ROOT / "run_in_colab.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed clean
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    return nb


def execute(nb, cwd):
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_colab_notebook_runs_from_uploaded_files_and_again(hf_gpt2_dir, data_dir, tmp_path):
    content = tmp_path / "content"  # the upload zip, uploaded through Colab's file panel
    content.mkdir()
    made = subprocess.run([sys.executable, "-m", "tools.report", "submission",
                           str(content / "submission.zip")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    parameters = dict(REPO_URL="", MODEL=str(hf_gpt2_dir), MAX_ITERS=2, RUNS="r16_a64", RESULTS_DIR="results",
                      USE_DRIVE=False, DATASET=str(data_dir), DEVICE="cpu", EXTRA=TINY + " eval_iters=2",
                      SHOTS="", USE_WANDB=False)
    nb = notebook(**parameters)
    printed = execute(nb, content)
    results = content / "results"
    assert f"results go to {results}" in printed
    markdown = (results / "results.md").read_text()
    assert "## Zero-shot" in markdown
    for run, runs_now in report.LABELS.items():
        for row in table_rows(markdown, runs_now):
            assert ("not run yet" in row) == (run != "r16_a64")
    plotted = json.loads((results / "val_loss.json").read_text())
    assert list(plotted["val_loss.png"]) == list(plotted["val_loss_alpha.png"]) == [report.LABELS["r16_a64"]]
    shown = [o for c in nb.cells if c.cell_type == "code"
             for o in c.outputs if o.get("output_type") == "display_data"]
    assert (sum("image/png" in o["data"] for o in shown) == 2
            and sum("text/markdown" in o["data"] for o in shown) == 1)

    stamps = {p: p.stat().st_mtime_ns for p in results.rglob("*.pt")}
    again = execute(notebook(**parameters), content)  # Run all once more, as after a disconnect
    assert "zero-shot: done already" in again and "r16_a64: done already" in again
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*.pt")} == stamps


def test_colab_setup_cell_clones_once_and_finds_the_clone_after_a_restart(tmp_path):
    content = tmp_path / "content"
    content.mkdir()
    nb = notebook(REPO_URL=str(ROOT))
    nb.cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", []) or "git" in c.source]
    nb.cells.append(nbformat.v4.new_code_cell("print('cwd', os.getcwd())"))
    for _ in range(2):  # a fresh kernel each time starts in the folder the clone was made in
        assert f"cwd {content / 'lora-gpt2'}" in execute(nb, content)
    assert (content / "lora-gpt2" / "train.py").is_file()


def test_a_run_is_reused_only_with_the_settings_asked_for(hf_gpt2_dir, small_data_dir, tmp_path):
    results = tmp_path / "results"
    config, _ = parse_flags("report.py", report.FLAGS, [f"results_dir={results}", f"init_from={hf_gpt2_dir}",
                                                        f"dataset={small_data_dir}", "device=cpu", "max_iters=2",
                                                        f"extra={TINY}"])
    train.main(report.train_argv(config, "r16_a64"))  # the run as report.py starts it, in this process
    run_dir = results / "r16_a64"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    other = tmp_path / "other_model"
    save_random_hf_gpt2(other, seed=1)
    cmd = [sys.executable, "-m", "tools.report", f"results_dir={results}", f"init_from={other}",
           f"dataset={small_data_dir}", "device=cpu", "max_iters=2", f"extra={TINY}", "runs=r16_a64",
           "shots=0", "shot_seeds=1"]
    refused = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr == (f"report.py: error: {run_dir} holds a run with other settings "
                              f"(init_from={str(hf_gpt2_dir)!r} there, {str(other)!r} asked for now); "
                              "replace it with overwrite=true, or choose another results_dir\n")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    assert os.listdir(results) == ["r16_a64"]  # refused before its first command (zero-shot, prompting)
    out = run_report(results, other, small_data_dir, "runs=r16_a64", "zero_shot=false", "overwrite=true")
    assert "done already" not in out
    assert load_checkpoint(run_dir / "ckpt_last.pt")["config"]["init_from"] == str(other)
    markdown = (results / "results.md").read_text()
    assert markdown.startswith(f"# Results: {other}\n")
    saved = json.loads((run_dir / "results.json").read_text())["results"]
    best = next(r for r in saved if r["checkpoint"] == "Best Val Checkpoint")
    assert (table_rows(markdown, report.LABELS["r16_a64"])[0].split("|")[4].strip()
            == f"{best['accuracy']:.4f}")


def test_submission_zip_holds_every_file_the_scripts_need_and_no_key(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.report", "submission",
                             str(tmp_path / "submission.zip")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(tmp_path / "submission.zip") as z:
        names = z.namelist()
        z.extractall(tmp_path / "unzipped")
    harness = [f"harness/{name}"
               for name in ("__init__.py", "checkpoints.py", "device.py", "flags.py", "run.py")]
    # never wandb_api.json: a key may be pasted there
    methods = ["bitfit.py", "adapters.py", "prefix.py", "finetune.py"]  # the other ways to fine-tune
    assert sorted(names) == sorted([*report.GRADED, *methods, *harness, "tools/__init__.py",
                                    "tools/report.py", "tools/prompting.py", "requirements.txt",
                                    "run_in_colab.ipynb"])
    for name in names:  # flat, as the course's upload wants, and the files as they are here
        assert (tmp_path / "unzipped" / name).read_bytes() == (ROOT / name).read_bytes()
    # nothing else is needed: the scripts import and show their help from the unzipped files alone
    for script in (["train.py"], ["generate.py"], ["-m", "tools.report"]):
        shown = subprocess.run([sys.executable, *script, "-h"], cwd=tmp_path / "unzipped",
                               capture_output=True, text=True, timeout=120)
        name = script[-1].replace("tools.", "") + ".py" * (script[0] == "-m")
        assert shown.returncode == 0 and shown.stdout.startswith(f"usage: python {name}"), shown.stderr


@pytest.mark.parametrize("shots", ["0,8", "4,x"])
def test_shots_that_cannot_run_stop_report_before_its_first_command(hf_gpt2_dir, small_data_dir, tmp_path,
                                                                    capsys, shots):
    from dataloader import check_demonstrations_fit, draw_demonstrations, load_rotten_tomatoes
    splits = load_rotten_tomatoes(str(small_data_dir))
    message = f"shots={shots!r}: expected whole numbers >= 0, comma-separated"
    if shots == "0,8":
        with pytest.raises(Exception) as e:  # the first demonstration set that does not fit is named
            for seed in range(2):
                demonstrations = [splits["train"][i] for i in draw_demonstrations(splits, 8, seed)]
                check_demonstrations_fit(demonstrations, splits["test"], "default", 256, 0)
        message = str(e.value)
    with pytest.raises(SystemExit) as e:
        report.main([f"results_dir={tmp_path / 'results'}", f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}",
                     "device=cpu", "runs=r16_a64", f"shots={shots}", "shot_seeds=2"])
    assert (e.value.code, capsys.readouterr().err) == (2, f"report.py: error: {message}\n")
    assert os.listdir(tmp_path) == []


def test_a_damaged_prompting_evaluation_is_redone_not_read(tmp_path):
    config, _ = parse_flags("report.py", report.FLAGS, [f"results_dir={tmp_path}", "shots=2", "shot_seeds=1"])
    path = tmp_path / "prompting" / "k2_seed0" / "last_evaluation.json"
    path.parent.mkdir(parents=True)
    settings = dict(init_from=config.init_from, dataset=config.dataset, num_examples=0, shots=2, shot_seed=0,
                    calibrate=True)
    row = dict(checkpoint=f"2-shot {config.init_from}", iter_num=None, method="logprob", parse=None,
               seconds=0.1, accuracy=0.75, positive=2, negative=2, correct=3, unparseable=0, total=4,
               settings=settings)
    evaluation = dict(run_id=None, split="test", complete=False, results=[row, dict(row, parse="calibrated")],
                      predictions=[{}, {}])
    path.write_text(json.dumps(evaluation))
    assert prompting.is_done(config, 2, 0) and "| 2-shot | 0.7500 | 1 of 1 |" in prompting.table(config)
    for damage in (lambda r: r.pop("settings"), lambda r: r.update(settings=None),
                   lambda r: r.pop("accuracy"), lambda r: r.update(accuracy="x")):
        damaged = json.loads(json.dumps(evaluation))
        damage(damaged["results"][0])
        path.write_text(json.dumps(damaged))
        assert not prompting.is_done(config, 2, 0)  # evaluated again, as if missing
        assert "| 2-shot | not run yet | 0 of 1 |" in prompting.table(config)


def test_the_methods_grid_tables_what_each_method_trains(hf_gpt2_dir, small_data_dir, tmp_path):
    results = tmp_path / "results"
    run_report(results, hf_gpt2_dir, small_data_dir, "runs=bitfit,prefix48", "zero_shot=false")
    markdown = (results / "results.md").read_text()
    for run, method, trainable in (("bitfit", "bitfit", 2 * 11 * 64 + 64),
                                   ("prefix48", "prefix", 2 * 2 * 48 * 64)):
        checkpoint = load_checkpoint(results / run / "ckpt.pt")
        assert checkpoint["config"]["method"] == method
        assert sum(t.numel() for t in checkpoint["model"].values()) == trainable
        saved = json.loads((results / run / "results.json").read_text())["results"]
        best, last = (next(r["accuracy"] for r in saved
                           if r["checkpoint"] == name and r["method"] == "generate")
                      for name in ("Best Val Checkpoint", "Last Iter Checkpoint"))
        total = 3_332_928 + (trainable if method == "prefix" else 0)
        size = os.path.getsize(results / run / "ckpt.pt") / 1e6
        cells = [c.strip() for c in table_rows(markdown, report.LABELS[run])[-1].strip("|").split("|")]
        assert cells[1:4] == [method, f"{trainable:,} ({100 * trainable / total:.2f}%)", f"{size:.1f} MB"]
        assert cells[5:] == [f"{best:.4f}", f"{last:.4f}"]
    assert f"| {report.LABELS['adapter24']} | not run yet | | | | | |" in markdown
    plotted = json.loads((results / "val_loss.json").read_text())["val_loss_methods.png"]
    assert set(plotted) == {report.LABELS["bitfit"], report.LABELS["prefix48"]}
    assert matplotlib.image.imread(results / "val_loss_methods.png").std() > 0
