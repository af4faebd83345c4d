"""Command-line settings for train.py and generate.py.

    python train.py [config_file.py] [key=value | --key=value | --key value ...]

Each flag's type is its default's type (a list default makes a flag that may repeat); `-` and
`_` in names are interchangeable; `rank`, `alpha` and `lr` stand for lora_rank, lora_alpha and
learning_rate. A mistake exits with status 2 and one line that names the flag.
"""
import contextlib
import difflib
import os
import sys
from types import SimpleNamespace

ALIASES = {"rank": "lora_rank", "alpha": "lora_alpha", "lr": "learning_rate"}
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
RANGES = {  # a flag's optional third entry: one of these, or a tuple of the values allowed
    "> 0": (lambda v: v > 0, "must be positive"),
    ">= 0": (lambda v: v >= 0, "must be >= 0"),
    "[0, 1)": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "[0, 2**32)": (lambda v: 0 <= v < 2**32, "must be in [0, 2**32)"),
}


class UsageError(Exception):
    pass


def fail(prog, message):
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _unquote(text):
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def canonical(name, flags):
    key = name.strip().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in flags:
        close = difflib.get_close_matches(key, list(flags) + list(ALIASES), n=1, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (-h lists the flags)"
        raise UsageError(f"unknown flag {name!r}{hint}")
    return key


def _looks_like_flag(arg, flags):
    name, has_value, _ = arg.partition("=")
    key = name.replace("-", "_")
    return arg.startswith("--") or (has_value and ALIASES.get(key, key) in flags)


def _convert(key, text, default):
    text = _unquote(text.strip())
    if isinstance(default, bool):
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise UsageError(f"{key}={text!r}: expected true or false")
    if isinstance(default, (int, float)):
        kind = type(default)
        try:
            value = kind(text)
        except ValueError:
            raise UsageError(f"{key}={text!r}: expected {'an integer' if kind is int else 'a number'}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise UsageError(f"{key}={text!r}: expected a finite number")
        return value
    return text


def _read_config_file(path, flags):
    if not path.endswith(".py"):
        raise UsageError(f"{path!r} is neither a key=value flag nor a .py config file")
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        namespace = {}
        exec(compile(source, path, "exec"), namespace)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read config file {path!r} ({e})") from None
    except Exception as e:
        raise UsageError(f"config file {path!r} failed: {type(e).__name__}: {e}") from None
    values = {}
    for name, value in namespace.items():
        if name.startswith("_") or callable(value) or type(value).__name__ == "module":
            continue
        key = canonical(name, flags)
        default = flags[key][0]
        ok = isinstance(value, type(default)) and (isinstance(value, bool) == isinstance(default, bool))
        ok = ok or (isinstance(default, float) and type(value) is int)
        ok = ok and not (isinstance(default, list) and not all(isinstance(v, str) for v in value))
        if not ok:
            raise UsageError(f"{path}: {name}={value!r}: expected {type(default).__name__}")
        values[key] = type(default)(value)
    return values


def _next_flag(args, flags):
    """(key, text) of the flag at the front of args, which it consumes; None for a config file."""
    arg = args.pop(0)
    if arg.startswith("--"):
        name, has_value, text = arg[2:].partition("=")
        key = canonical(name, flags)
        if not has_value:
            if isinstance(flags[key][0], bool):  # a bare --flag means true; a following true/false is its value
                text = args.pop(0) if args and args[0].strip().lower() in TRUE + FALSE else "true"
            elif args and not _looks_like_flag(args[0], flags):
                text = args.pop(0)
            else:
                raise UsageError(f"--{name} needs a value")
        return key, text
    if "=" in arg and not arg.startswith("-"):
        name, _, text = arg.partition("=")
        return canonical(name, flags), text
    if arg.startswith("-"):
        raise UsageError(f"unknown option {arg!r} (flags are key=value or --key=value; -h lists them)")
    args.insert(0, arg)
    return None


def _parse(flags, argv):
    """({flag: value}, flags set explicitly): defaults, then config files, then flags in order."""
    config, explicit, given = {key: spec[0] for key, spec in flags.items()}, set(), set()
    args = list(argv)
    while args:
        flag = _next_flag(args, flags)
        if flag is None:
            values = _read_config_file(args.pop(0), flags)
            config.update(values)
            explicit.update(values)
            continue
        key, text = flag
        value = _convert(key, text, flags[key][0])
        if isinstance(flags[key][0], list):  # a list flag collects each time it is given
            value = config[key] + [value] if key in given else [value]
        elif key in given:
            raise UsageError(f"{key} is given twice ({config[key]!r} and {value!r}); give it once")
        config[key] = value
        given.add(key)
        explicit.add(key)
    for key, spec in flags.items():
        _check_range(key, config[key], spec[2] if len(spec) > 2 else None)
    return config, explicit


def _check_range(key, value, rule):
    if rule is None:
        return
    if isinstance(rule, tuple):
        if value not in rule:
            allowed = " or ".join(rule) if len(rule) == 2 else "one of " + _listed(rule)
            raise UsageError(f"{key}={value!r}: must be {allowed}")
    elif not RANGES[rule][0](value):
        raise UsageError(f"{key}={value!r}: {RANGES[rule][1]}")


def _listed(values):
    return ", ".join(v or "''" for v in values)


def help_text(prog, flags, summary):
    width = max(len(f"{k}={spec[0]!r}") for k, spec in flags.items())
    lines = [f"usage: python {prog} [config_file.py] [key=value ...]", "", summary.strip(), "",
             "flags (also --key=value or --key value; '-' and '_' are interchangeable):"]
    for k, (default, text, *allowed) in flags.items():
        if allowed:
            text += f" ({allowed[0] if isinstance(allowed[0], str) else _listed(allowed[0])})"
        lines.append(f"  {f'{k}={default!r}':<{width}}  {text}")
    aliases = [f"{a} = {k}" for a, k in ALIASES.items() if k in flags]
    if aliases:
        lines += ["", "aliases: " + ", ".join(aliases)]
    return "\n".join(lines)


def parse_flags(prog, flags, argv, summary=""):
    """flags: {name: (default, help)} or {name: (default, help, allowed)}, allowed a key of RANGES or a
    tuple of values. Returns (config, names set explicitly), config with one
    attribute per flag (vars(config) is the dict); exits on -h or on a mistake."""
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(prog, flags, summary))
        sys.exit(0)
    try:
        values, explicit = _parse(flags, argv)
    except UsageError as e:
        fail(prog, str(e))
    return SimpleNamespace(**values), explicit


def is_local_path(name):
    """name means a directory here, not a Hugging Face hub id such as gpt2 or org/name."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or ("/" in name and os.path.isdir(name.split("/")[0]))


def device_and_dtype(device, dtype):
    """The device and precision to run on. device auto: CUDA where present, else the CPU. dtype auto:
    bfloat16 on CUDA cards that support it, float16 on older ones (a T4), float32 elsewhere."""
    import torch
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device={device!r}: expected auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device={device!r}: CUDA is not available on this machine (use device=cpu)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device={device!r}: MPS is not available on this machine (use device=cpu)")
    if dtype == "auto":
        dtype = "float32" if kind != "cuda" else "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dtype == "float16" and kind != "cuda":
        raise UsageError("dtype='float16' needs CUDA; on this device use float32 or bfloat16")
    if dtype == "bfloat16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("dtype='bfloat16': this GPU does not support it (use float16 or auto)")
    return device, dtype


def distributed(device):
    """(rank, world size, device): torchrun's, where its WORLD_SIZE says there are several processes;
    (0, 1, device) for a process of its own. They join a process group only to train (process_group)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return 0, 1, device
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    except (KeyError, ValueError):
        raise UsageError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}, RANK={os.environ.get('RANK')!r} and LOCAL_RANK="
                         f"{os.environ.get('LOCAL_RANK')!r}: expected whole numbers, as torchrun sets them") from None
    if device.startswith("cuda"):
        import torch
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    return rank, world, device


@contextlib.contextmanager
def process_group(device, world):
    """torchrun's processes joined for the time they train, then parted once all are done. Joined
    after the model is loaded: a group that is up when transformers' model code is first imported
    (or that DistributedDataParallel has used) outlives destroy_process_group, and its threads can
    then abort the interpreter's exit."""
    if world == 1:
        yield
        return
    import torch.distributed as dist
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    try:
        yield
        dist.barrier()  # every process is past its last collective before any leaves the group
    finally:
        dist.destroy_process_group()


def autocast(device, dtype):
    """Mixed precision for the forward pass; weights stay float32."""
    import torch
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))
