import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

import generate
import train
from harness.flags import parse_flags
from conftest import ROOT


def parse(argv, flags=train.FLAGS):
    return parse_flags("train.py", flags, argv)


def test_three_forms_aliases_hyphens():
    config, explicit = parse(["rank=16", "--alpha=64", "--lr", "1e-3", "--max-iters", "7", "lora-dropout=0.1",
                              "--mask_prompt", "false", "--compile", "out_dir='runs/a b'"])
    assert (config.lora_rank, config.lora_alpha, config.learning_rate) == (16, 64.0, 1e-3)
    assert ((config.max_iters, config.lora_dropout, config.mask_prompt, config.compile)
            == (7, 0.1, False, True))
    assert config.out_dir == "runs/a b"
    assert explicit == {"lora_rank", "lora_alpha", "learning_rate", "max_iters", "lora_dropout",
                        "mask_prompt", "compile", "out_dir"}
    assert config.batch_size == train.FLAGS["batch_size"][0]


def run_cli(*args, script="train.py"):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args, message", [
    (["lora_rnk=4"], "train.py: error: unknown flag 'lora_rnk' (did you mean lora_rank?)"),
    (["--learning-rat=1"], "train.py: error: unknown flag 'learning-rat' (did you mean learning_rate?)"),
    (["max_iters=abc"], "train.py: error: max_iters='abc': expected an integer"),
    (["lr=fast"], "train.py: error: learning_rate='fast': expected a number"),
    (["compile=maybe"], "train.py: error: compile='maybe': expected true or false"),
    (["--lr"], "train.py: error: --lr needs a value"),
    (["-x"], "train.py: error: '-x' is not a flag (flags are key=value or --key=value; -h lists them)"),
    (["config.py"],
     "train.py: error: 'config.py' is not a flag (flags are key=value or --key=value; -h lists them)"),
    (["rank=-1"], "train.py: error: lora_rank=-1: must be >= 0"),
    (["lora_dropout=1.0"], "train.py: error: lora_dropout=1.0: must be in [0, 1)"),
    (["max_iters=0"], "train.py: error: max_iters=0: must be positive"),
    (["eval_interval=0"], "train.py: error: eval_interval=0: must be positive"),
    (["prompt_template=fancy"], "train.py: error: prompt_template='fancy': must be default or question"),
    (["max_iters=2", "max_iters=3"], "train.py: error: max_iters is given twice (2 and 3); give it once"),
    (["beta2=1"], "train.py: error: beta2=1.0: must be in [0, 1)"),
    (["weight_decay=-0.1"], "train.py: error: weight_decay=-0.1: must be >= 0"),
    (["device=cuda"],
     "train.py: error: device='cuda': CUDA is not available on this machine (use device=cpu)"),
    (["dtype=float16"],
     "train.py: error: dtype='float16' needs CUDA; on this device use float32 or bfloat16"),
    (["dtype=int8"], "train.py: error: dtype='int8': must be one of auto, float32, bfloat16, float16"),
])
def test_usage_errors_exit_2_with_one_line(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main([f"out_dir={tmp_path / 'out'}", "init_from=scratch", *args])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == message
    assert not (tmp_path / "out").exists()


def test_the_process_exits_2_with_one_line(tmp_path):
    result = run_cli("max_itres=5", f"out_dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr == "train.py: error: unknown flag 'max_itres' (did you mean max_iters?)\n"


@pytest.mark.parametrize("module, option", [(train, "-h"), (generate, "--help")])
def test_help_lists_every_flag_with_its_default(module, option, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["max_iters=abc", option])  # help wins over anything else on the line
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name, (default, help_text, *allowed) in module.FLAGS.items():
        line = next(l for l in out.splitlines() if l.startswith(f"  {name}={default!r} "))
        assert help_text in line
        if allowed:  # the values a flag takes are listed beside its help
            listed = allowed[0] if isinstance(allowed[0], str) else ", ".join(v or "''" for v in allowed[0])
            assert line.endswith(f" ({listed})")
    assert ("aliases: rank = lora_rank, alpha = lora_alpha, lr = learning_rate" in out) == (module is train)


argument = st.one_of(
    st.text(max_size=20),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(list(train.FLAGS) + ["rank", "lr", "nope"]),
              st.text(max_size=8)),
    st.builds(lambda k: f"--{k}", st.sampled_from(list(train.FLAGS) + ["max-iters", "x"])),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(argument, max_size=6))
def test_any_argument_list_parses_or_exits_2(argv):
    argv = [a for a in argv if a not in ("-h", "--help")]
    try:
        config, explicit = parse(argv)
    except SystemExit as e:
        assert e.code == 2
    else:
        assert set(vars(config)) == set(train.FLAGS) and explicit <= set(train.FLAGS)
        for key, (default, *_) in train.FLAGS.items():
            assert type(getattr(config, key)) is type(default)
