"""Checkpoints without pickled code: weights in safetensors, the rest in weights_only-loadable files.

Every file is written to a temporary name and renamed, so a kill never leaves a torn checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from wsi_damm.util.errors import InputError
from wsi_damm.util.files import atomic_write, write_json


def save_weights(path: Path, module_or_state, metadata: dict | None = None) -> None:
    state = module_or_state.state_dict() if hasattr(module_or_state, "state_dict") else module_or_state
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_weights(path: Path, module: torch.nn.Module | None = None, device: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "weights file is missing", "train this stage first, or point to the right run directory")
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(
            path, f"is not a readable safetensors file ({exc})", "the checkpoint is truncated or corrupt; retrain or restore it"
        ) from exc
    if module is not None:
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise InputError(path, f"does not fit this model configuration: {first}") from exc
    return state


def save_state(path: Path, state: dict) -> None:
    """Optimiser / RNG / step: tensors and plain containers only, so `weights_only=True` loads it."""
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for crafted files, EOFError for torn ones
        raise InputError(
            path,
            f"refused to load training state: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            "only tensors and plain values are accepted; restart without --resume",
        ) from exc


def save_checkpoint(
    ckpt: Path,
    step: int,
    weights: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer | torch.amp.GradScaler],
    write_rows,
) -> None:
    """Step k's weights and state go into a folder of their own; `latest.json` is switched to it last
    (one atomic rename), so a kill at any instant leaves the previous checkpoint whole and named.
    Both stages checkpoint this way: `weights` name → module, `optimizers` state key → optimiser."""
    folder = ckpt / f"step_{step:09d}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in weights.items():
        save_weights(folder / f"{name}.safetensors", module, {"step": step})
    save_state(
        folder / "state.pt", {"step": step, **{k: o.state_dict() for k, o in optimizers.items()}, "torch_rng": torch.get_rng_state()}
    )
    write_rows()  # the metrics so far; rows beyond the named step are dropped on resume
    write_json(ckpt / "latest.json", {"step": step, "folder": folder.name})
    for old in ckpt.glob("step_*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
