"""The report's deep-zoom comparison viewer: measured and predicted NP, |error|, sd over draws and where the
measured value leaves the draws' interval, the
gate's divergence and multi-modal share, CD31 and DAPI — side by side with linked pan and zoom, or
overlaid with an opacity slider — from full resolution to the whole slide, with a µm scale bar and
the figures' colour scales. OpenSeadragon (BSD-3, vendored) shows DZI tiles written beside the page,
so the report folder opens from disk in any browser, with no server.
"""

from __future__ import annotations

import html
import json
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from wsi_damm.evaluation.deepzoom import Pyramid, SourceLevel, colour_map, write_dzi
from wsi_damm.evaluation.truth import Truth
from wsi_damm.stitching.slide_map import COVERAGE, DIVERGENCE, HIGH, LOW, SD, SHARE, MapImage
from wsi_damm.tiling.grid import nearest, unit_range

ASSETS = "viewer_assets"  # package data: openseadragon.min.js and its licence
OSD_FILES = ("openseadragon.min.js", "OPENSEADRAGON_LICENSE.txt")


@dataclass(frozen=True)
class Layer:
    key: str
    title: str
    cmap: str
    vmin: float
    vmax: float
    unit: str


LAYERS = (  # colour scales of the viewer and the report's figures (report.LAYER_STYLE)
    Layer("measured", "NP measured", "viridis", 0, 1, "normalised NP"),
    Layer("predicted", "NP predicted", "viridis", 0, 1, "normalised NP"),
    Layer("error", "|predicted − measured|", "inferno", 0, 0.5, "absolute error"),
    Layer("sd", "sd over draws", "plasma", 0, 0.25, "sd of normalised NP"),
    Layer("outside", "measured outside the draws' interval", "coolwarm", -1, 1, "−1 below it, 0 inside, +1 above it"),
    Layer("divergence", "divergence d = 1 − mean κ", "coolwarm", 0, 1, "d (uni-modal where d ≥ γ)"),
    Layer("share", "multi-modal share (DAMMP)", "PuOr", 0, 1, "share of steps on the multi-modal branch"),
    Layer("vessels", "CD31 (vessels)", "magma", 0, 1, "normalised intensity"),
    Layer("nuclei", "DAPI (nuclei)", "Blues_r", 0, 1, "normalised intensity"),
)


class _Difference:
    """|a − b| where `covered` holds, NaN elsewhere, at any scale: the error layer, never stored."""

    def __init__(self, a: Pyramid, b: Pyramid, covered: Pyramid):
        self.a, self.b, self.covered, self.shape = a, b, covered, a.shape

    def region(self, scale: float, y: int, x: int, h: int, w: int) -> np.ndarray:
        err = np.abs(self.a.region(scale, y, x, h, w) - self.b.region(scale, y, x, h, w))
        return np.where(self.covered.region(scale, y, x, h, w) >= 0.5, err, np.nan)


class _Outside:
    """Where the measured value leaves the draws' interval: −1 below its low bound, +1 above its high bound,
    0 inside, NaN where nothing was predicted. Below full resolution the bounds and the measured channel are
    each averaged first, so a coarse pixel says where the averages fall."""

    def __init__(self, measured: Pyramid, low: Pyramid, high: Pyramid, covered: Pyramid):
        self.measured, self.low, self.high, self.covered, self.shape = measured, low, high, covered, measured.shape

    def region(self, scale: float, y: int, x: int, h: int, w: int) -> np.ndarray:
        meas = self.measured.region(scale, y, x, h, w)
        side = np.sign(meas - self.high.region(scale, y, x, h, w)).clip(0, 1) - np.sign(self.low.region(scale, y, x, h, w) - meas).clip(
            0, 1
        )
        return np.where(self.covered.region(scale, y, x, h, w) >= 0.5, side, np.nan)


class _Masked:
    def __init__(self, values: Pyramid, covered: Pyramid):
        self.values, self.covered, self.shape = values, covered, values.shape

    def region(self, scale: float, y: int, x: int, h: int, w: int) -> np.ndarray:
        return np.where(self.covered.region(scale, y, x, h, w) >= 0.5, self.values.region(scale, y, x, h, w), np.nan)


def _map_channel(m: MapImage, channel: int, shape: tuple[int, int]) -> Pyramid:
    w0 = m.level0.shape[2]
    levels = []
    for lv in m.levels:
        ds = w0 / lv.shape[2]
        levels.append(
            SourceLevel(
                lambda y, x, h, w, lv=lv: np.asarray(lv[channel, y : y + h, x : x + w], np.float32), shape if ds == 1 else lv.shape[1:], ds
            )
        )
    return Pyramid(levels)


def _patch_map(m: MapImage, channel: int, shape: tuple[int, int]) -> Pyramid:
    """A patch-maps channel (one value per block): full resolution by repetition, then its own pyramid."""
    b, w0 = m.block, m.level0.shape[2]

    def full(y, x, h, w):
        return nearest(m.blocks(y, x, h, w)[channel].astype(np.float32), 1 / b, y % b, x % b, h, w)

    levels = [SourceLevel(full, shape, 1.0)]
    for lv in m.patch_maps:
        levels.append(
            SourceLevel(lambda y, x, h, w, lv=lv: np.asarray(lv[channel, y : y + h, x : x + w], np.float32), lv.shape[1:], w0 / lv.shape[2])
        )
    return Pyramid(levels)


def _slide_channel(truth: Truth, role: str) -> Pyramid:
    """A channel of the measured slide, normalised as evaluation does, from the slide's own levels."""
    plan, slide = truth.plan, truth.slide
    k = plan.spec.roles.index(role)
    levels = [SourceLevel(lambda y, x, h, w: truth.normalised(role, y, x, h, w), truth.shape, 1.0)]
    for j, lev in enumerate(slide.levels):
        ds = lev.downsample / plan.choice.downsample
        if ds > 1.001:
            levels.append(
                SourceLevel(
                    lambda y, x, h, w, j=j: unit_range(
                        slide.read_region(j, y, x, h, w, (k,))[0].astype(np.float32), plan.lo[k], plan.hi[k]
                    ),
                    lev.shape[1:],
                    ds,
                )
            )
    return Pyramid(levels)


def layer_sources(m: MapImage, truth: Truth) -> dict[str, object]:
    """Every layer this map and slide have, as objects with `.shape` and `.region(scale, y, x, h, w)`."""
    shape = truth.shape
    covered = _patch_map(m, COVERAGE, shape)
    pred = _map_channel(m, 0, shape)
    out: dict[str, object] = {}
    if "target" in truth.plan.spec.roles:
        out["measured"] = _slide_channel(truth, "target")
    out["predicted"] = pred
    if "measured" in out:
        out["error"] = _Difference(pred, out["measured"], covered)
    if m.level0.shape[0] > SD:  # NP sd over draws
        out["sd"] = _Masked(_map_channel(m, SD, shape), covered)
    if m.interval:  # the draws' central interval (`sampling.draws`), and where the measured channel leaves it
        out["low"], out["high"] = (_Masked(_map_channel(m, c, shape), covered) for c in (LOW, HIGH))
        if "measured" in out:
            out["outside"] = _Outside(out["measured"], _map_channel(m, LOW, shape), _map_channel(m, HIGH, shape), covered)
    if m.gamma is not None:
        out["divergence"] = _Masked(_patch_map(m, DIVERGENCE, shape), covered)
        out["share"] = _Masked(_patch_map(m, SHARE, shape), covered)
    for role in ("vessels", "nuclei"):
        if role in truth.plan.spec.roles:
            out[role] = _slide_channel(truth, role)
    return out


def _gradient(layer: Layer) -> str:
    import matplotlib

    stops = matplotlib.colormaps[layer.cmap](np.linspace(0, 1, 11))
    return ", ".join(f"rgb({r * 255:.0f},{g * 255:.0f},{b * 255:.0f}) {i * 10}%" for i, (r, g, b, _) in enumerate(stops))


def copy_assets(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in OSD_FILES:
        with resources.as_file(resources.files("wsi_damm.evaluation").joinpath(ASSETS, name)) as src:
            shutil.copyfile(src, folder / name)


def write_viewer(report: Path, m: MapImage, truth: Truth, workers: int = 2) -> dict:
    """`report/viewer_<slide>.html` and its tiles in `report/viewer/<slide>/`; returns what was written
    and how long the tiles took."""
    t0 = time.perf_counter()
    slide = m.slide_id
    tiles = report / "viewer" / slide
    shutil.rmtree(tiles, ignore_errors=True)
    tiles.mkdir(parents=True)
    copy_assets(report / "viewer")
    sources = layer_sources(m, truth)
    layers = []
    for layer in LAYERS:
        if layer.key not in sources:
            continue
        desc = write_dzi(tiles, layer.key, sources[layer.key], colour_map(layer.cmap, layer.vmin, layer.vmax), workers=workers)
        desc["Image"]["Url"] = f"viewer/{slide}/{desc['Image']['Url']}"
        layers.append(
            {
                "key": layer.key,
                "title": layer.title,
                "unit": layer.unit,
                "vmin": layer.vmin,
                "vmax": layer.vmax,
                "gradient": _gradient(layer),
                "dzi": desc,
            }
        )
    page = report / f"viewer_{slide}.html"
    page.write_text(_html(slide, layers, m.mpp, truth.shape), encoding="utf-8")
    return {"page": page.name, "layers": [la["key"] for la in layers], "seconds": round(time.perf_counter() - t0, 1)}


def _html(slide: str, layers: list[dict], mpp: float | None, shape: tuple[int, int]) -> str:
    data = json.dumps({"slide": slide, "mpp": mpp, "shape": list(shape), "layers": layers})
    title = html.escape(f"{slide}: deep-zoom comparison")
    return _PAGE.replace("__TITLE__", title).replace("__DATA__", data.replace("</", "<\\/"))


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
 body{font-family:system-ui,sans-serif;margin:12px;background:#fafafa;color:#222}
 h1{font-size:18px;margin:0 0 6px} .bar{margin:6px 0 10px;font-size:13px}
 #grid{display:grid;grid-template-columns:repeat(4,minmax(0,1fr));gap:10px}
 .panel{background:#fff;border:1px solid #ddd;padding:4px}
 .panel h2{font-size:13px;margin:2px 0 4px;font-weight:600}
 .osd{height:300px;background:#1f1f1f;position:relative}
 #overlay .osd{height:640px}
 .cbar{height:10px;margin-top:4px;border:1px solid #999}
 .clab{display:flex;justify-content:space-between;font-size:11px;color:#555}
 .scale{position:absolute;left:10px;bottom:10px;z-index:5;color:#fff;font-size:11px;text-align:center;pointer-events:none}
 .scale div{border:2px solid #fff;border-top:none;height:5px}
 #overlay{display:none} select,input{font-size:13px}
</style></head><body>
<h1>__TITLE__</h1>
<div class="bar">View: <label><input type="radio" name="mode" value="grid" checked> side by side (linked pan and zoom)</label>
 <label><input type="radio" name="mode" value="overlay"> overlay</label>
 <span id="ovctl" style="display:none"> — base <select id="base"></select> overlay <select id="top"></select>
 opacity <input id="opacity" type="range" min="0" max="1" step="0.05" value="0.5"></span>
 <span id="status" style="margin-left:12px;color:#777"></span></div>
<div id="grid"></div>
<div id="overlay" class="panel"><div class="osd" id="osd-overlay"></div></div>
<script src="viewer/openseadragon.min.js"></script>
<script>
const DATA = __DATA__;
const viewers = [];
let syncing = false;
function niceLength(um){const p=Math.pow(10,Math.floor(Math.log10(um)));for(const m of [5,2,1]){if(m*p<=um)return m*p;}return p;}
function addScaleBar(viewer, el){
  const bar=document.createElement('div');bar.className='scale';el.appendChild(bar);
  const update=()=>{ if(!DATA.mpp){bar.textContent='scale unknown';return;}
    const zoom=viewer.viewport.viewportToImageZoom(viewer.viewport.getZoom(true));
    const umPerPx=DATA.mpp/zoom; const um=niceLength(umPerPx*120);
    bar.innerHTML='<div style="width:'+(um/umPerPx).toFixed(0)+'px"></div>'+(um>=1000?(um/1000)+' mm':um+' µm');};
  viewer.addHandler('animation',update);viewer.addHandler('open',update);viewer.addHandler('resize',update);
}
function link(src){
  src.addHandler('viewport-change',()=>{
    if(syncing)return; syncing=true;
    const z=src.viewport.getZoom(), c=src.viewport.getCenter();
    for(const v of viewers){ if(v!==src){ v.viewport.zoomTo(z,null,true); v.viewport.panTo(c,true);} }
    syncing=false;});
}
function makeViewer(id, tileSources){
  return OpenSeadragon({id:id, tileSources:tileSources, drawer:'canvas', showNavigationControl:false,
                        prefixUrl:'viewer/images/', maxZoomPixelRatio:4, visibilityRatio:0.5, crossOriginPolicy:false});
}
const grid=document.getElementById('grid');
const opened=[];
for(const layer of DATA.layers){
  const panel=document.createElement('div');panel.className='panel';
  panel.innerHTML='<h2>'+layer.title+'</h2><div class="osd" id="osd-'+layer.key+'"></div>'+
    '<div class="cbar" style="background:linear-gradient(to right,'+layer.gradient+')"></div>'+
    '<div class="clab"><span>'+layer.vmin+'</span><span>'+layer.unit+'</span><span>'+layer.vmax+'</span></div>';
  grid.appendChild(panel);
  const v=makeViewer('osd-'+layer.key, layer.dzi); v.layerKey=layer.key; viewers.push(v);
  addScaleBar(v, document.getElementById('osd-'+layer.key));
  opened.push(new Promise(r=>v.addOnceHandler('open',r)));
}
window.wsiViewers=viewers;
window.wsiReady=Promise.all(opened).then(()=>{viewers.forEach(link);document.getElementById('status').textContent='';return true;});
document.getElementById('status').textContent='loading…';
// overlay mode: one viewer, two layers, an opacity slider
const base=document.getElementById('base'), top_=document.getElementById('top');
DATA.layers.forEach((l,i)=>{base.add(new Option(l.title,i));top_.add(new Option(l.title,i));});
base.value=DATA.layers.findIndex(l=>l.key==='measured')>=0?DATA.layers.findIndex(l=>l.key==='measured'):0;
top_.value=DATA.layers.findIndex(l=>l.key==='predicted');
let ov=null;
function showOverlay(){
  const b=DATA.layers[base.value], t=DATA.layers[top_.value], op=parseFloat(document.getElementById('opacity').value);
  if(ov){ov.destroy();}
  document.getElementById('osd-overlay').innerHTML='';
  ov=makeViewer('osd-overlay',[{tileSource:b.dzi},{tileSource:t.dzi,opacity:op}]);
  addScaleBar(ov, document.getElementById('osd-overlay'));
  window.wsiOverlay=ov;
}
document.getElementById('opacity').addEventListener('input',e=>{
  if(ov&&ov.world.getItemCount()>1) ov.world.getItemAt(1).setOpacity(parseFloat(e.target.value)); });
base.addEventListener('change',showOverlay); top_.addEventListener('change',showOverlay);
for(const r of document.querySelectorAll('input[name=mode]')){
  r.addEventListener('change',()=>{ const o=r.value==='overlay'&&r.checked;
    document.getElementById('grid').style.display=o?'none':'grid';
    document.getElementById('overlay').style.display=o?'block':'none';
    document.getElementById('ovctl').style.display=o?'inline':'none';
    if(o&&!ov)showOverlay(); });
}
</script></body></html>
"""
