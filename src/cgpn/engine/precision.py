"""Numeric precision of training: fp32, bf16 autocast, or fp16 autocast with a gradient scaler.

``engine.precision: auto`` takes the fastest setting that is safe on the device:

| device | auto |
|---|---|
| CUDA GPU with bf16 (compute capability 8.0+: A100, H100, RTX 30xx...) | bf16 |
| older CUDA GPU (V100, T4...) | fp16 + GradScaler |
| CPU with native bf16 (AVX512-BF16 or AMX: Xeon Cooper Lake / Sapphire Rapids, Zen 4+) | bf16 |
| other CPUs (AVX2 only) | fp32: bf16 is emulated there and ~25x slower (ResNet-50 on an AVX2 EPYC) |

Losses are computed outside autocast, in fp32, from the network's (possibly bf16) outputs.

One exception on the CPU: oneDNN's bf16 strided convolution whose output is one pixel wide is wrong.
On a 2-core AVX512-BF16 Xeon its weight gradient came back with garbage (NaN) at the kernel taps that see only
padding in about 1 step of 40 (torch 2.14, ResNet-18 layer4 at 2 x 1 pixels: 39 of 400 backward passes, 0 at
4 x 2 or 3 x 3; fp32: 0 of 3,000); on an AMX Xeon (Sapphire Rapids) the forward pass of a stride-2 3 x 3
convolution from 4 x 2 or 3 x 2 pixels to 2 x 1 is off by more than the values themselves (batches of 2-32,
64-256 channels; 49 of 528 shapes tried wrong, every one of them a stride-2 3 x 3 convolution to a 1-wide
output; 0 of 384 with 1-high outputs). Images 16 pixels wide or less (32 or less for MGN's stride-2 global
branch) make such outputs in a ResNet, so training and inference pick fp32 there (``narrow_strided_convs``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cgpn.config import CHOICES
from cgpn.errors import ConfigError

__all__ = ["CPU_FLAGS", "INT8_DOT_FLAGS", "PRECISIONS", "Precision", "cpu_has_int8_dot", "cpu_has_native_bf16", "cpu_info",
           "machine_description", "narrow_strided_convs", "resolve_precision"]

logger = logging.getLogger(__name__)

PRECISIONS = CHOICES["engine.precision"]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's own probe for AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast bf16 path either
        return False


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")  # what decides the fast paths
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # x86 int8 dot-product instructions (VNNI, AMX)


@functools.cache
def cpu_info() -> tuple[str, frozenset[str], int]:
    """(model name, flags, logical cores) from /proc/cpuinfo; ("unknown CPU", {}, 0) where there is none."""
    model, flags, cores = "unknown CPU", frozenset(), 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                model, cores = value.strip(), cores + 1
            elif key == "flags":
                flags = frozenset(value.split())
    except OSError:  # not Linux: the model and flags are unknown here
        pass
    return model, flags, cores


def cpu_has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions (``INT8_DOT_FLAGS``), which int8 matrix multiplies use."""
    return any(flag in cpu_info()[1] for flag in INT8_DOT_FLAGS)


def machine_description(device: torch.device | str = "cpu", threads: int | None = None) -> str:
    """What a figure was measured on, in one line: the GPU's name, or the CPU's model, its vector and
    matrix flags (``CPU_FLAGS``), its cores, the torch threads it ran with (``threads``, default: torch's
    current number) and whether bf16 is native (figures differ several-fold between such CPUs), then the
    load average."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    model, flags, cores = cpu_info()
    have = [f for f in CPU_FLAGS if f in flags] or ["flags unknown"]
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    threads = threads or torch.get_num_threads()
    return (f"{model}, {cores or '?'} cores, {' '.join(have)}, {threads} torch thread{'s' * (threads != 1)}, bf16 "
            f"{'native' if cpu_has_native_bf16() else 'emulated'} (torch {torch.__version__}){load}")


@dataclass(frozen=True)
class Precision:
    """A resolved precision: the autocast dtype (``None`` = fp32) and whether gradients are scaled."""

    name: str  # fp32 | bf16 | fp16
    device_type: str  # cpu | cuda

    @property
    def dtype(self) -> torch.dtype | None:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    @property
    def scaled(self) -> bool:
        """fp16 needs loss scaling (its range underflows small gradients); bf16 does not."""
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of the forward pass (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler, enabled only for fp16 (a disabled one passes calls through)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.scaled)


def narrow_strided_convs(model: torch.nn.Module, height: int, width: int) -> list[str]:
    """Names of ``model``'s strided convolutions (kernel wider than 1) whose output is one pixel wide for
    ``height`` x ``width`` images: where the CPU's bf16 convolutions are unreliable (see the module notes).
    Found by one fp32 forward pass of a blank image with hooks; the model is left as it was."""
    found: list[str] = []
    hooks = [m.register_forward_hook(lambda _m, _args, out, name=name: found.append(name) if out.shape[-1] == 1
                                     else None)
             for name, m in model.named_modules()
             if isinstance(m, torch.nn.Conv2d) and m.stride[1] > 1 and m.kernel_size[1] > 1]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, height, width, device=next(model.parameters()).device))
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    return found


def resolve_precision(name: str, device: torch.device) -> Precision:
    """The precision ``engine.precision`` asks for on ``device`` (``auto``: see the module table)."""
    if name not in PRECISIONS:
        raise ConfigError(f"engine.precision must be one of {', '.join(PRECISIONS)} (e.g. bf16), got {name!r}")
    if device.type == "cuda":
        has_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if name == "auto":
            name = "bf16" if has_bf16 else "fp16"
        elif name == "bf16" and not has_bf16:
            raise ConfigError(f"engine.precision=bf16: {torch.cuda.get_device_name(device)} has no bf16; "
                              f"use fp16 (with a grad scaler) or fp32")
    elif device.type == "cpu":
        if name == "auto":
            name = "bf16" if cpu_has_native_bf16() else "fp32"
        elif name == "fp16":
            raise ConfigError("engine.precision=fp16 needs a CUDA GPU; on the CPU use bf16 (CPUs with "
                              "AVX512-BF16/AMX) or fp32")
        elif name == "bf16" and not cpu_has_native_bf16():
            logger.warning("engine.precision=bf16 on a CPU without native bf16 (%s): expect it to be many "
                           "times slower than fp32", torch.backends.cpu.get_cpu_capability())
    elif name == "auto":
        name = "fp32"
    return Precision(name, device.type)
