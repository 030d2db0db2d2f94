"""A held-out region cut from the user's only image: `bench --heldout-fraction F` splits each training image along
its longer side into a training part and a held-out part (the last part, holding a share F of the image's tissue),
written as OME-TIFFs that keep the image's pixel size, data type and channel names, so that no held-out pixel is
ever seen in training. The share is of tissue, not of pixels: a round core or a section off-centre in its image would
otherwise leave the held-out part nearly empty."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import zarr

from wsi_damm.slides import SlideSpec
from wsi_damm.slides.ome import build_pyramid, fast_codec, write_ome_tiff
from wsi_damm.util.errors import InputError

BAND = 512  # rows (or columns) copied at a time: memory stays flat with the image's size


def split_cut(tissue: np.ndarray, fraction: float, patch: int) -> int:
    """First held-out pixel along an axis whose pixels hold `tissue` (the tissue in each column, or row, of the image):
    on the patch grid, at least one patch on each side, the held-out part's share of the tissue as near `fraction`
    as the grid allows (of the pixels, where the image has no tissue)."""
    length = len(tissue)
    if not 0 < fraction < 1:
        raise InputError("--heldout-fraction", f"must lie strictly between 0 and 1, got {fraction}")
    if length < 2 * patch:
        raise InputError("--heldout-fraction", f"an image {length} px long cannot hold a {patch}-px patch on each side of a cut")
    weight = np.asarray(tissue, np.float64) if np.sum(tissue) > 0 else np.ones(length)
    after = np.concatenate([np.cumsum(weight[::-1])[::-1], [0.0]]) / weight.sum()  # share of the tissue from each pixel on
    cuts = np.arange(patch, (length - patch) // patch * patch + 1, patch)
    return int(cuts[np.argmin(np.abs(after[cuts] - fraction))])


def tissue_profile(spec: SlideSpec, patch: int, axis: int) -> np.ndarray:
    """Tissue per level-0 column (axis 1) or row (axis 0) of the image, from the tissue mask tiling draws."""
    from wsi_damm.tiling.plan import TileConfig, plan_slide

    plan = plan_slide(spec, TileConfig(patch_size=patch, overlap=0, level=0, min_tissue=0.0))
    low = plan.mask.sum(axis=1 - axis).astype(np.float64)
    with spec.open() as slide:
        length = slide.levels[0].shape[1 + axis]
    index = np.minimum((np.arange(length) / plan.mask_downsample).astype(int), len(low) - 1)
    return low[index]


def split_slides(specs: list[SlideSpec], fraction: float, out_dir: Path, patch: int, log=print) -> tuple[list[Path], list[Path], bool]:
    """Each slide's training and held-out parts as OME-TIFFs in OUT_DIR (channels in role order: vessels, nuclei,
    target), and whether any was written now; parts already written for the same slide, fraction and rule are reused."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train, held, wrote = [], [], False
    for spec in specs:
        parts = {k: out_dir / f"{spec.slide_id}.{k}.ome.tif" for k in ("train", "heldout")}
        record = out_dir / f"{spec.slide_id}.split.json"
        wanted = {"source": spec.describe(), "fraction": fraction, "patch": patch, "rule": "share of the tissue"}
        done = record.exists() and json.loads(record.read_text(encoding="utf-8")).get("request") == wanted
        if not (done and all(p.exists() for p in parts.values())):
            boxes = _write_parts(spec, fraction, patch, parts, out_dir)
            record.write_text(json.dumps({"request": wanted, "parts": boxes}, indent=1), encoding="utf-8")
            log(f"{spec.slide_id}: training part {boxes['train']}, held-out part {boxes['heldout']} (y, x, height, width)")
            wrote = True
        train.append(parts["train"])
        held.append(parts["heldout"])
    return train, held, wrote


def part_channels() -> str:
    """The `--channels` map of a written part (its channels are in role order)."""
    return "vessels=0,nuclei=1,target=2"


def _write_parts(spec: SlideSpec, fraction: float, patch: int, parts: dict[str, Path], out_dir: Path) -> dict[str, list[int]]:
    with spec.open() as slide:
        _, h, w = slide.levels[0].shape
        names = [ref.name for _, ref in spec.channels]
        if w >= h:
            cut = split_cut(tissue_profile(spec, patch, 1), fraction, patch)
            boxes = {"train": [0, 0, h, cut], "heldout": [0, cut, h, w - cut]}
        else:
            cut = split_cut(tissue_profile(spec, patch, 0), fraction, patch)
            boxes = {"train": [0, 0, cut, w], "heldout": [cut, 0, h - cut, w]}
        for key, (y0, x0, bh, bw) in boxes.items():
            scratch = Path(tempfile.mkdtemp(prefix=f".{spec.slide_id}.", dir=out_dir))
            try:
                root = zarr.open_group(scratch / "part.zarr", mode="w")
                dtype = np.dtype(slide.dtype)
                level0 = root.create_array(
                    "0", shape=(len(names), bh, bw), dtype=dtype, chunks=(1, 256, 256), compressors=fast_codec(dtype), fill_value=0
                )
                for y in range(0, bh, BAND):
                    rows = min(BAND, bh - y)
                    level0[:, y : y + rows, :] = slide.read_region(0, y0 + y, x0, rows, bw)
                levels = build_pyramid(root)
                write_ome_tiff(
                    parts[key], levels, names, slide.mpp, description=f"{key} part {boxes[key]} (y, x, height, width) of {spec.paths[0]}"
                )
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    return boxes
