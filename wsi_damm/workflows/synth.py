"""`wsi-damm synth`: the simulator's slides written tile by tile as pyramidal OME-TIFF, with their truth
(the noiseless target field, the divergence mask) and a preview."""

from __future__ import annotations

import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import tifffile
import zarr

from wsi_damm.slides.ome import build_pyramid, fast_codec, write_ome_tiff
from wsi_damm.util.files import write_json
from wsi_damm.util.progress import progress_bar
from wsi_damm.workflows.simulator import MARGIN, SIMULATOR_VERSION, TILE, Layout, SynthConfig, camera, make_layout, render_window


def _render_tile(cfg: SynthConfig, lay: Layout, index: int, ty: int, tx: int, root: zarr.Group) -> None:
    size = cfg.size
    y0, x0 = max(ty - MARGIN, 0), max(tx - MARGIN, 0)
    y1, x1 = min(ty + TILE + MARGIN, size), min(tx + TILE + MARGIN, size)
    sig = render_window(cfg, lay, index, y0, x0, y1 - y0, x1 - x0)
    crop = (slice(ty - y0, ty - y0 + min(TILE, size - ty)), slice(tx - x0, tx - x0 + min(TILE, size - tx)))
    rng = np.random.default_rng([cfg.seed, index, ty, tx, 2])
    out = np.stack([camera(rng, sig[name][crop]) for name in cfg.channels])
    th, tw = out.shape[1:]
    root["slide/0"][:, ty : ty + th, tx : tx + tw] = out
    root["clean/0"][0, ty : ty + th, tx : tx + tw] = sig[cfg.channels[2]][crop].astype(np.float32)
    root["divergence/0"][0, ty : ty + th, tx : tx + tw] = (sig["divergent"][crop] > 0.5).astype(np.uint8)


def preview_png(levels: list[zarr.Array], path: Path) -> None:
    """RGB composite of the smallest level: CD31 red, NP green, DAPI blue; robust contrast."""
    import imagecodecs

    small = np.asarray(levels[-1][:]).astype(np.float32)
    rgb = np.zeros(small.shape[1:] + (3,), np.float32)
    for ch, colour in zip(range(3), (0, 2, 1)):
        lo, hi = np.percentile(small[ch], [1, 99.7])
        rgb[..., colour] = np.clip((small[ch] - lo) / max(hi - lo, 1), 0, 1)
    path.write_bytes(imagecodecs.png_encode(np.rint(rgb * 255).astype(np.uint8)))


def write_slide(out_dir: Path, name: str, index: int, cfg: SynthConfig, workers: int = 2, progress: bool = True) -> dict[str, Path]:
    """Render one slide into pyramidal OME-TIFFs (slide + truth) and a PNG preview."""
    out_dir = Path(out_dir)
    truth = out_dir / "truth"
    truth.mkdir(parents=True, exist_ok=True)
    lay = make_layout(cfg, index)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
    try:
        root = zarr.open_group(scratch / "work.zarr", mode="w")
        size = cfg.size
        chunk = (1, min(256, size), min(256, size))
        for key, c, dtype in (("slide", 3, np.uint16), ("clean", 1, np.float32), ("divergence", 1, np.uint8)):
            root.create_array(f"{key}/0", shape=(c, size, size), dtype=dtype, chunks=chunk, compressors=fast_codec(dtype), fill_value=0)
        tiles = [(ty, tx) for ty in range(0, size, TILE) for tx in range(0, size, TILE)]
        with ThreadPoolExecutor(max(1, workers)) as pool:
            jobs = pool.map(lambda t: _render_tile(cfg, lay, index, t[0], t[1], root), tiles)
            for _ in progress_bar(
                jobs, total=len(tiles), desc=f"synth {name}", unit="tile", disable=None if progress else True, leave=False
            ):
                pass
        paths = {
            "slide": out_dir / f"{name}.ome.tif",
            "clean": truth / f"{name}.{cfg.clean_suffix}.ome.tif",
            "divergence": truth / f"{name}.divergence.ome.tif",
            "preview": out_dir / f"{name}.preview.png",
        }
        names = {"slide": list(cfg.channels), "clean": [f"{cfg.channels[2]}_clean"], "divergence": ["divergent"]}
        for key in ("slide", "clean", "divergence"):
            levels = build_pyramid(root, key)
            write_ome_tiff(paths[key], levels, names[key], cfg.mpp, description=provenance(cfg, index))
            if key == "slide":
                preview_png(levels, paths["preview"])
        return paths
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def provenance(cfg: SynthConfig, index: int) -> str:
    """The line each synthetic image carries as its OME Description."""
    target = "" if cfg.target == "np" else f", target {cfg.target}"
    return f"wsi-damm synth: simulator version {SIMULATOR_VERSION}, seed {cfg.seed}, slide {index}{target}"


def simulator_version(path: str | Path) -> int | None:
    """The simulator version a synthetic OME-TIFF was written by (None: not written by `synth`)."""
    with tifffile.TiffFile(path) as tif:
        found = re.search(r"wsi-damm synth: simulator version (\d+)", tif.ome_metadata or "")
    return int(found.group(1)) if found else None


def write_slides(
    out_dir: Path, n_slides: int, cfg: SynthConfig, workers: int = 2, progress: bool = True, prefix: str = "synth"
) -> list[dict[str, Path]]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for i in progress_bar(range(n_slides), desc="slides", unit="slide", disable=None if (progress and n_slides > 1) else True):
        results.append(write_slide(out_dir, f"{prefix}_{i:03d}", i, cfg, workers, progress))
    write_json(out_dir / "truth" / "synth_config.json", {"simulator_version": SIMULATOR_VERSION, **asdict(cfg)})
    return results
