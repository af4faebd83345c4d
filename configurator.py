"""Command-line settings for train.py and generate.py.

    python train.py [config_file.py] [key=value | --key=value | --key value ...]

Each flag's type is its default's type (a list default makes a flag that may repeat); `-` and
`_` in names are interchangeable; `rank`, `alpha` and `lr` stand for lora_rank, lora_alpha and
learning_rate. A mistake exits with status 2 and one line that names the flag.
"""
import contextlib
import difflib
import os
import socket
import sys
import urllib.parse
from types import SimpleNamespace

ALIASES = {"rank": "lora_rank", "alpha": "lora_alpha", "lr": "learning_rate"}
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class UsageError(Exception):
    pass


def fail(prog, message):
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _unquote(text):
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _canonical(name, flags):
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
        key = _canonical(name, flags)
        default = flags[key][0]
        ok = isinstance(value, type(default)) and (isinstance(value, bool) == isinstance(default, bool))
        ok = ok or (isinstance(default, float) and type(value) is int)
        ok = ok and not (isinstance(default, list) and not all(isinstance(v, str) for v in value))
        if not ok:
            raise UsageError(f"{path}: {name}={value!r}: expected {type(default).__name__}")
        values[key] = type(default)(value)
    return values


def _parse(flags, argv):
    config, explicit = {key: default for key, (default, _) in flags.items()}, set()

    def assign(key, value):
        repeated = isinstance(flags[key][0], list) and not isinstance(value, list)
        config[key] = config[key] + [value] if repeated else value
        explicit.add(key)

    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--"):
            name, has_value, text = arg[2:].partition("=")
            key = _canonical(name, flags)
            if not has_value:
                if isinstance(flags[key][0], bool):
                    # a bare --flag means true; a following true/false is its value
                    has_bool = bool(args) and args[0].strip().lower() in TRUE + FALSE
                    text = args.pop(0) if has_bool else "true"
                elif args and not _looks_like_flag(args[0], flags):
                    text = args.pop(0)
                else:
                    raise UsageError(f"--{name} needs a value")
            assign(key, _convert(key, text, flags[key][0]))
        elif "=" in arg and not arg.startswith("-"):
            name, _, text = arg.partition("=")
            key = _canonical(name, flags)
            assign(key, _convert(key, text, flags[key][0]))
        elif arg.startswith("-"):
            raise UsageError(f"unknown option {arg!r} (flags are key=value or --key=value; -h lists them)")
        else:
            for key, value in _read_config_file(arg, flags).items():
                assign(key, value)
    return config, explicit


def help_text(prog, flags, summary):
    width = max(len(f"{k}={d!r}") for k, (d, _) in flags.items())
    lines = [f"usage: python {prog} [config_file.py] [key=value ...]", "", summary.strip(), "",
             "flags (also --key=value or --key value; '-' and '_' are interchangeable):"]
    lines += [f"  {f'{k}={d!r}':<{width}}  {h}" for k, (d, h) in flags.items()]
    aliases = [f"{a} = {k}" for a, k in ALIASES.items() if k in flags]
    if aliases:
        lines += ["", "aliases: " + ", ".join(aliases)]
    return "\n".join(lines)


def parse_flags(prog, flags, argv, summary=""):
    """flags: {name: (default, help)}. Returns (config, names set explicitly), config with one
    attribute per flag (vars(config) is the dict); exits on -h or on a mistake."""
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(prog, flags, summary))
        sys.exit(0)
    try:
        values, explicit = _parse(flags, argv)
    except UsageError as e:
        fail(prog, str(e))
    return SimpleNamespace(**values), explicit


def check_source(flag, name):
    """Before anything is loaded: a directory named by flag must exist; for a Hugging Face hub name,
    where the hub cannot be reached, the Hugging Face libraries are told to use their local cache at
    once instead of retrying for a minute (call it before they are imported)."""
    from model import is_local_path
    if is_local_path(name):
        if not os.path.isdir(name):
            raise UsageError(f"{flag}={name!r}: no such directory")
    elif not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"


def source_error(flag, name, error):
    """The one line for weights that cannot be loaded: what went wrong, and the flag that fixes it."""
    from model import GPT2_SIZES
    close = difflib.get_close_matches(name, GPT2_SIZES, n=1, cutoff=0.8)
    hint = f"did you mean {flag}={close[0]}?" if close and close[0] != name else f"a local copy works too: {flag}=DIR"
    return UsageError(f"{flag}={name!r}: {error}; {hint}")


def hub_reachable():
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows; the libraries find out themselves
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
        return True
    except OSError:
        return False


def resolve_device(device):
    """'auto' picks CUDA when present; asking for a device this machine lacks is a UsageError."""
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UsageError(f"device={device!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device={device!r}: CUDA is not available on this machine (use device=cpu)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device={device!r}: MPS is not available on this machine (use device=cpu)")
    return device


def resolve_dtype(dtype, device):
    """'auto': bfloat16 on CUDA cards that support it, float16 on older ones (T4), float32 elsewhere."""
    import torch
    on_cuda = device.startswith("cuda")
    if dtype == "auto":
        if not on_cuda:
            return "float32"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"dtype={dtype!r}: expected auto, float32, bfloat16 or float16")
    if dtype == "float16" and not on_cuda:
        raise UsageError("dtype='float16' needs CUDA; on this device use float32 or bfloat16")
    if dtype == "bfloat16" and on_cuda and not torch.cuda.is_bf16_supported():
        raise UsageError("dtype='bfloat16': this GPU does not support it (use float16 or auto)")
    return dtype


def device_name(device):
    """What the device is, for reports: the GPU's model name, or the device type."""
    import torch
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return device


def autocast(device, dtype):
    """Mixed precision for the forward pass; weights stay float32."""
    import torch
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))
