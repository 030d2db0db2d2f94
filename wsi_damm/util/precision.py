"""Mixed precision, with one meaning of `--amp` in `train` and `predict`: autocast of the diffusion
U-Net to bf16 or fp16, or off. fp16 training adds a gradient scaler (fp16 gradients underflow
without one); bf16 has fp32's exponent and needs none, but older GPUs lack it. torch is imported
only where used, so configs and `--help` stay light."""

from __future__ import annotations

from wsi_damm.util.errors import InputError

AMP_MODES = ("off", "bf16", "fp16")


def amp_mode(value: str | bool | None) -> str:
    """`--amp` as a mode name; True / False are what runs written before the modes stored (bf16 / off)."""
    if value is None or value is False:
        return "off"
    if value is True:
        return "bf16"
    if value not in AMP_MODES:
        raise InputError("--amp", f"must be {', '.join(AMP_MODES)}, got {value!r}")
    return str(value)


def autocast(device, mode: str):
    """The autocast context of `mode` on `device` (a torch.device); "off" also switches off any autocast around it."""
    import torch

    if mode == "off":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[mode])


def grad_scaler(device, mode: str):
    """A dynamic loss scaler (torch.amp.GradScaler) for fp16 training, None otherwise; checkpointed with the optimiser."""
    import torch

    return torch.amp.GradScaler(device.type) if mode == "fp16" else None
