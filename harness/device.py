"""Where a command runs: the device, and one autocast context for its forward passes."""
import contextlib

import torch

from harness.flags import UsageError


def device_and_dtype(device, dtype):
    """device auto: CUDA where present, else the CPU. dtype auto: bfloat16 on CUDA cards that support
    it, float16 on older ones (a T4, with loss scaling), float32 elsewhere."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device={device!r}: expected auto, cpu, cuda, cuda:N or mps")
    available = dict(cpu=True, cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available())
    if not available[kind]:
        raise UsageError(f"device={device!r}: {kind.upper()} is not available on this machine (use "
                         "device=cpu)")
    if dtype == "auto":
        dtype = "float32" if kind != "cuda" else "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dtype == "float16" and kind != "cuda":
        raise UsageError("dtype='float16' needs CUDA; on this device use float32 or bfloat16")
    if dtype == "bfloat16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("dtype='bfloat16': this GPU does not support it (use float16 or auto)")
    return device, dtype


def autocast(device, dtype):
    """Mixed precision for forward passes (nanoGPT's ctx); the weights stay float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))


def device_name(device):
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else device
