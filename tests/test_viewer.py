"""The report's deep-zoom viewer: DZI geometry and pixels against independent references, streaming
reads, and — in a real headless Chromium — that the predicted panel shows the map and that panning
and zooming one panel moves the others."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image
from skimage.transform import downscale_local_mean, resize

from tests.chromium import Chromium, find_browser
from tests.conftest import run_cli
from wsi_damm.evaluation.deepzoom import WHOLE_LEVEL, Pyramid, SourceLevel, colour_map, dzi_geometry, write_dzi


def _field(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (0.5 + 0.5 * np.sin(yy / 37.0) * np.cos(xx / 23.0)).astype(np.float32)


def _pyramid(full: np.ndarray, reads: list | None = None) -> Pyramid:
    levels = []
    for k in range(4):
        level = downscale_local_mean(full, (2**k, 2**k)) if k else full

        def read(y, x, h, w, level=level):
            if reads is not None:
                reads.append(h * w)
            return level[y : y + h, x : x + w]

        levels.append(SourceLevel(read, level.shape, float(2**k)))
    return Pyramid(levels)


def test_dzi_levels_follow_the_published_layout():
    """Level 0 is 1 × 1, the top level ceil(log2(max side)), level L ceil(side / 2^(top − L)) (Deep Zoom)."""
    geom = dzi_geometry(2000, 1500)
    assert len(geom) == 12 and geom[0] == (1, 1) and geom[-1] == (2000, 1500) and geom[8] == (250, 188)


def test_tiles_hold_the_colour_mapped_pixels(tmp_path):
    full = _field(700, 1000)
    colour = colour_map("viridis", 0, 1)
    desc = write_dzi(tmp_path, "layer", _pyramid(full), colour, tile=254, overlap=1, quality=100)
    assert desc["Image"]["Size"] == {"Width": "1000", "Height": "700"} and desc["Image"]["xmlns"].endswith("deepzoom/2008")
    top = tmp_path / "layer_files" / "10"
    assert len(list(top.glob("*.jpg"))) == math.ceil(1000 / 254) * math.ceil(700 / 254)
    inner = np.asarray(Image.open(top / "1_1.jpg"), np.float32)  # an inner tile: 254 + 1 px overlap on each side
    assert inner.shape == (256, 256, 3)
    expect = colour(full[253:509, 253:509]).astype(np.float32)
    assert np.abs(inner - expect).mean() < 2.0  # JPEG at quality 100
    coarse = np.asarray(Image.open(tmp_path / "layer_files" / "8" / "0_0.jpg"), np.float32)  # scale 4: block means
    expect = colour(downscale_local_mean(full, (4, 4))[:, :250]).astype(np.float32)
    assert coarse.shape == expect.shape and np.abs(coarse - expect).mean() < 2.0


def test_tiling_streams(tmp_path):
    """A 6000² layer is never read whole: fine levels read tile by tile, coarse levels one small level."""
    reads: list[int] = []
    write_dzi(tmp_path, "big", _pyramid(_field(6000, 6000), reads), colour_map("magma", 0, 1), workers=1)
    assert max(reads) <= (2 * WHOLE_LEVEL) ** 2 and max(reads) < 6000 * 6000 / 4


@pytest.fixture(scope="module")
def report(small, small_map, tmp_path_factory):
    """The report of the small map, with its viewer."""
    out = tmp_path_factory.mktemp("viewer") / "report"
    res = run_cli("evaluate", str(small_map / "m.ome.zarr"), "--truth", str(small), "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    return out


def test_qc_pictures_of_tiling_and_stitching(report, small_map):
    """`tile` draws the slide, its tissue outline and the kept patches; `stitch` a map thumbnail; the
    report embeds the thumbnail."""
    d = small_map
    tiling = np.asarray(Image.open(d / "c.qc" / "synth_000.png").convert("RGB")).astype(int)
    yellow = (tiling[..., 0] > 200) & (tiling[..., 1] > 200) & (tiling[..., 2] < 80)
    green = (tiling[..., 1] > 150) & (tiling[..., 0] < 150) & (tiling[..., 2] < 150)
    assert yellow.sum() > 100 and green.sum() > 100  # the tissue outline and the patch squares are drawn
    thumb = np.asarray(Image.open(d / "m.thumbnail.png").convert("RGB"))
    assert thumb.shape[0] > 200 and thumb.std() > 10
    assert "qc_synth_000_m.thumbnail" in (report / "report.html").read_text()


def test_report_links_a_viewer_that_ships_its_viewer(report):
    html = (report / "report.html").read_text()
    assert "viewer_synth_000.html" in html
    assert (report / "viewer" / "openseadragon.min.js").stat().st_size > 300_000
    assert (
        "BSD" in (report / "viewer" / "OPENSEADRAGON_LICENSE.txt").read_text()
        or "Redistribution" in (report / "viewer" / "OPENSEADRAGON_LICENSE.txt").read_text()
    )
    page = (report / "viewer_synth_000.html").read_text()
    for key in ("measured", "predicted", "error", "divergence", "share", "vessels", "nuclei"):
        assert f"viewer/synth_000/{key}_files/" in page


@pytest.mark.slow(adds="the viewer page opened by a real headless Chromium, its tiles loaded and drawn")
@pytest.mark.skipif(find_browser() is None, reason="no Chromium here (.ci/run installs it)")
def test_viewer_in_a_real_browser(report, small_map, tmp_path):
    from wsi_damm.stitching.slide_map import open_map

    with Chromium(1500, 900) as browser:
        browser.goto((report / "viewer_synth_000.html").resolve().as_uri())
        browser.wait_for("window.wsiReady !== undefined")
        assert browser.js("window.wsiReady") is True
        browser.wait_for("window.wsiViewers.every(v => v.world.getItemAt(0).getFullyLoaded())")
        keys = browser.js("window.wsiViewers.map(v => v.layerKey)")
        assert keys[:2] == ["measured", "predicted"]
        shot = np.asarray(Image.open(io.BytesIO(browser.screenshot())).convert("RGB"), np.float32)
        (tmp_path / "viewer.png").write_bytes(browser.screenshot())  # kept for a person to look at
        # where the predicted map sits on the page (element box + the image's bounds inside it)
        box = browser.js("""(() => { const v = window.wsiViewers[1], r = v.element.getBoundingClientRect();
            const s = v.world.getItemAt(0).getContentSize();
            const a = v.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
            const b = v.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(s.x, s.y));
            return [r.left + a.x, r.top + a.y, r.left + b.x, r.top + b.y]; })()""")
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        bar = browser.js(
            "(() => { const r = document.querySelector('#osd-predicted .scale').getBoundingClientRect();"
            " return [r.left, r.top, r.right, r.bottom]; })()"
        )
        panel = shot[y0:y1, x0:x1]
        keep = np.ones(panel.shape[:2], bool)  # the scale bar is drawn over the map: not the map's pixels
        keep[max(0, int(bar[1]) - y0 - 2) : int(bar[3]) - y0 + 2, max(0, int(bar[0]) - x0 - 2) : int(bar[2]) - x0 + 2] = False
        m = open_map(small_map / "m.ome.zarr")
        thumb = np.asarray(m.levels[-1][0], np.float32)
        expect = colour_map("viridis", 0, 1)(resize(thumb, panel.shape[:2], order=1, anti_aliasing=True)).astype(np.float32)
        lum = lambda rgb: rgb @ np.array([0.299, 0.587, 0.114], np.float32)  # noqa: E731
        blocks = lambda a: downscale_local_mean(a[: a.shape[0] // 4 * 4, : a.shape[1] // 4 * 4], (4, 4))  # noqa: E731  (no sub-pixel phase)
        ok = blocks(keep.astype(np.float32)) == 1
        r = np.corrcoef(blocks(lum(panel))[ok], blocks(lum(expect))[ok])[0, 1]
        assert r > 0.95, r  # the panel shows this map, not just anything non-blank
        assert np.abs(panel[keep].mean(axis=0) - expect[keep].mean(axis=0)).max() < 8

        # zoom and pan the predicted panel; every other panel follows to the same place
        before = browser.js("document.querySelector('#osd-predicted .scale').textContent")
        browser.js(
            "(() => { const v = window.wsiViewers[1]; v.viewport.zoomTo(6, null, true);"
            " v.viewport.panTo(new OpenSeadragon.Point(0.3, 0.4), true); return true; })()"
        )
        browser.wait_for(
            "(() => { const vs = window.wsiViewers, z = vs[1].viewport.getZoom();"
            " return vs.every(v => Math.abs(v.viewport.getZoom() - z) < 1e-9); })()",
            timeout=10,
        )
        views = browser.js("window.wsiViewers.map(v => [v.viewport.getZoom(), v.viewport.getCenter().x, v.viewport.getCenter().y])")
        for z, cx, cy in views:
            assert z == pytest.approx(6) and cx == pytest.approx(0.3) and cy == pytest.approx(0.4)
        browser.wait_for("document.querySelector('#osd-predicted .scale').textContent !== " + repr(before), timeout=10)
