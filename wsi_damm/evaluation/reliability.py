"""The report's picture and paragraph of the draws' spread (`intervals`): reliability and coverage."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def reliability_figure(path: Path, results: list[dict]) -> Path | None:
    """Binned expected RMSE (from the draws' spread) against observed RMSE of the mean map, one line per slide,
    with the diagonal an honest spread would follow; None (nothing written) when no slide has draws."""
    checked = [r for r in results if r.get("uncertainty", {}).get("spread_error", {}).get("bins")]
    if not checked:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 5))
    top = 0.0
    for r in checked:
        bins = r["uncertainty"]["spread_error"]["bins"]
        x, y = [b["expected_rmse"] for b in bins], [b["observed_rmse"] for b in bins]
        top = max(top, *x, *y)
        ax.plot(x, y, "o-", label=f"{r['slide']} (Spearman {r['uncertainty']['spread_error']['spearman']:.2f})")
    ax.plot([0, top * 1.05], [0, top * 1.05], color="0.5", ls="--", label="honest spread")
    ax.set_xlim(0, top * 1.05)
    ax.set_ylim(0, top * 1.05)
    ax.set_xlabel("expected RMSE of the mean map (draws' sd · √((K+1)/(K−1)))")
    ax.set_ylabel("observed RMSE against the measured channel")
    ax.set_title("Reliability of the draws' spread\n(patches in bins of equal count; above the line: overconfident)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def uncertainty_html(u: dict, fmt) -> str:
    """One paragraph: coverage against the nominal level, the rank correlation, a warning when dishonest."""
    se = u["spread_error"]
    text = (
        f"<p>Draws' spread ({u['draws']} draws): the measured channel lies inside their central interval (sorted draws "
        f"{u['rank']} to {u['draws'] + 1 - u['rank']} at every pixel, nominal {100 * u['nominal']:.0f} %) at "
        f"<b>{100 * u['coverage']:.1f} %</b> of the tissue pixels ({100 * u['below']:.1f} % below, {100 * u['above']:.1f} % above). "
        f"Rank correlation of a patch's spread and its error: <b>{fmt(se['spearman'])}</b> over {se['patches']} patches "
        "(1: the draws point at exactly the patches the map gets wrong).</p>"
    )
    before = u.get("before_calibration")
    if before:
        text += (
            f"<p>The spread was calibrated (<code>predict --calibrated</code>: sd and interval × {fmt(u.get('scale'))}); "
            f"the draws' own interval held <b>{100 * before['coverage']:.1f} %</b> of the tissue pixels.</p>"
        )
    if u.get("check"):
        text += f"<p style='color:#b22222'><b>Warning: {html.escape(u['check'])}.</b></p>"
    return text
