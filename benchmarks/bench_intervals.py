"""The draws' interval, per run, from a finished `wsi-damm bench` folder: for every mean-of-draws row and seed, the
coverage of the draws' central interval over the held-out tissue (below, inside, above) against its nominal level,
the rank correlation of patch spread and patch error, and the map's Pearson's r — what `evaluate` recorded in
BENCH/predictions/*/result.json, gathered into one JSON beside the bench's own summary.

    python benchmarks/bench_intervals.py BENCH --json benchmarks/results/bench/NAME_intervals.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def gather(bench: Path) -> dict:
    runs = []
    for result in sorted((bench / "predictions").glob("*_k*/result.json")):
        variant, seed, k = result.parent.name.rsplit("_", 2)
        for s in json.loads(result.read_text())["slides"]:
            u = s.get("uncertainty")
            if not u:
                continue
            runs.append(
                {
                    "variant": variant,
                    "seed": int(seed.removeprefix("seed")),
                    "draws": int(k.removeprefix("k")),
                    "slide": s["slide"],
                    "nominal": u["nominal"],
                    "coverage": u["coverage"],
                    "below": u["below"],
                    "above": u["above"],
                    "pixels": u["pixels"],
                    "spread_spearman": u["spread_error"]["spearman"],
                    "patches": u["spread_error"]["patches"],
                    "pearson_r": s["check"]["pearson_r"],
                    "mean_ratio": s["check"]["mean_ratio"],
                }
            )
    summary = {}
    for variant in sorted({r["variant"] for r in runs}):
        mine = [r for r in runs if r["variant"] == variant]
        summary[variant] = {"nominal": mine[0]["nominal"], "seeds": len(mine)}
        for key in ("coverage", "below", "above"):
            v = np.array([r[key] for r in mine], np.float64)
            summary[variant][key] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else math.nan}
    bench_json = json.loads((bench / "bench.json").read_text())
    return {
        "benchmark": "bench_intervals",
        "bench": bench_json.get("train"),
        "plan": bench_json.get("plan"),
        "summary": summary,
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = gather(args.bench)
    text = json.dumps(out, indent=1, default=lambda v: None)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
