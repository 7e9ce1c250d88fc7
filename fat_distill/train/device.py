"""Choosing the device and what follows from it (AMP dtype, pinned memory, channels_last)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("fat_distill.train")

_warned_no_cuda = False


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into a device.

    ``"auto"`` picks ``cuda:0`` when CUDA is available and the CPU otherwise; the
    CPU fallback is logged once. Asking for CUDA where there is none is an error,
    not a silent fallback.
    """
    global _warned_no_cuda
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if not _warned_no_cuda:
            log.info("no CUDA device found: training on the CPU")
            _warned_no_cuda = True
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available here; use 'cpu' or 'auto'")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


@dataclass(frozen=True)
class DeviceSettings:
    """How to run on a device: mixed precision, memory format, host-to-device copies."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    pin_memory: bool
    non_blocking: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=self.non_blocking)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images


def device_settings(device: torch.device, *, amp: bool | None = None, channels_last: bool | None = None) -> DeviceSettings:
    """Defaults per device: on CUDA, AMP (bf16 where supported, else fp16), channels_last,
    pinned memory and non-blocking copies; on the CPU, plain float32.

    Args:
        amp: force mixed precision on/off (None: on for CUDA only).
        channels_last: force the memory format (None: on for CUDA only).
    """
    cuda = device.type == "cuda"
    use_amp = cuda if amp is None else amp
    amp_dtype = None
    if use_amp:
        if cuda:
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            amp_dtype = torch.bfloat16
    return DeviceSettings(
        device=device,
        amp_dtype=amp_dtype,
        channels_last=cuda if channels_last is None else channels_last,
        pin_memory=cuda,
        non_blocking=cuda,
    )


def set_cpu_threads(threads: int | None) -> int:
    """Limit torch's intra-op CPU threads for this process (``None`` keeps the current setting).

    On a machine whose cores are shared (other jobs, a Prefect server, data loading),
    torch's default of one thread per core makes its threads wait for each other;
    fewer threads can be many times faster. Returns the thread count now in force.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            log.info("torch uses %d CPU thread(s)", threads)
    return torch.get_num_threads()
