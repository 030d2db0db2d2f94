"""`--device auto|cpu|cuda|cuda:N|mps`, one meaning in `train` and `predict`. The name is checked
when a config is built (no torch needed); the device itself is resolved when a stage starts."""

from __future__ import annotations

import re

from wsi_damm.util.errors import InputError

DEVICE_HELP = "auto | cpu | cuda | cuda:N | mps (auto: CUDA, else Apple MPS, else CPU; under torchrun each rank takes cuda:LOCAL_RANK)."
_NAME = re.compile(r"auto|cpu|mps|cuda(?::(\d+))?")


def check_device_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name.strip().lower()):
        raise InputError("--device", f"unknown device {name!r}", "choose auto, cpu, cuda, cuda:N or mps")


def resolve_device(name: str, local_rank: int | None = None):
    """The torch.device `name` stands for on this machine; `local_rank` is set under torchrun, where
    every rank takes its own GPU (cuda:LOCAL_RANK), so naming one GPU there is refused."""
    import torch

    check_device_name(name)
    name = name.strip().lower()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps and local_rank is None else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not mps:
            raise InputError("--device", "mps was requested but Apple's Metal backend is not available here")
        if local_rank is not None:
            raise InputError("--device", "mps cannot be shared by several torchrun ranks", "run one process, or use cuda / cpu")
        return torch.device("mps")
    index = _NAME.fullmatch(name).group(1)
    if not torch.cuda.is_available():
        raise InputError("--device", f"{name} was requested but no CUDA device is available")
    count = torch.cuda.device_count()
    if local_rank is not None:
        if index is not None:
            raise InputError("--device", f"{name} names one GPU, but under torchrun each rank uses cuda:LOCAL_RANK", "pass --device cuda")
        index = local_rank
    index = int(index or 0)
    if index >= count:
        raise InputError("--device", f"cuda:{index} does not exist: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return torch.device(f"cuda:{index}")
