"""A testbed_curve sweep's runs against the curve's own methods on the same fine-tunes and start noise, seed
by seed: mean SSCD/pixel AS of each, and in how many seeds the sweep's run beats both baselines and
FineXtract at the reference w.

    python benchmarks/sweep_vs_curve.py --run=testbed_work/curve_k:testbed_work/curve_k/sweep.csv \
        [--run=CURVE_DIR:SWEEP_CSV ...] [--w=fit] [--method=finextract]

Each --run pairs a curve workdir (its curve.csv: finextract at the reference w, cfg, text2img per point and
seed) with a sweep.csv of that workdir's fine-tunes; rows are kept where the sweep's w (a number or 'fit')
and method match. Prints one markdown row per point with every seed present in both.
"""
from __future__ import annotations

import argparse
import csv
import statistics

KEY = ("set", "finetune", "finetune_steps", "learning_rate")


def read(curve_csv: str, sweep_csv: str, w: str, method: str) -> dict:
    """{point key: {seed: {method or 'sweep': AS, 'error_drop', 'fitted_w'?}}}."""
    points: dict = {}
    for r in csv.DictReader(open(curve_csv)):
        seed = points.setdefault(tuple(r[k] for k in KEY), {}).setdefault(r["seed"], {})
        seed[r["method"]], seed["error_drop"] = float(r["AS"]), float(r["error_drop"])
    for r in csv.DictReader(open(sweep_csv)):
        if r["method"] != method or (r["guidance_scale"] != w and not _same_number(r["guidance_scale"], w)):
            continue
        seed = points.get(tuple(r[k] for k in KEY), {}).get(r["seed"])
        if seed is not None:
            seed["sweep"] = float(r["AS"])
            if r.get("fitted_w"):
                seed["fitted_w"] = float(r["fitted_w"])
    return points


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def table(points: dict, label: str) -> str:
    lines = [f"| set | fine-tune | steps | lr | error drop | fitted w | {label} | FineXtract, reference w | cfg | text2img "
             f"| {label} > both baselines | {label} > reference w |", "|---|---|---:|---:|" + "---:|" * 8]
    mean = lambda seeds, k: statistics.mean(s[k] for s in seeds)
    for key, by_seed in points.items():
        seeds = [s for s in by_seed.values() if "sweep" in s and "cfg" in s]
        if not seeds:
            continue
        fitted = (f"{mean(seeds, 'fitted_w'):.2f} [{min(s['fitted_w'] for s in seeds):.2f}, "
                  f"{max(s['fitted_w'] for s in seeds):.2f}]") if all("fitted_w" in s for s in seeds) else ""
        wins = sum(s["sweep"] > max(s["cfg"], s["text2img"]) for s in seeds)
        beats = sum(s["sweep"] > s["finextract"] for s in seeds)
        lines.append(f"| {' | '.join(key)} | {mean(seeds, 'error_drop'):.3f} | {fitted} | {mean(seeds, 'sweep'):.3f} | "
                     f"{mean(seeds, 'finextract'):.3f} | {mean(seeds, 'cfg'):.3f} | {mean(seeds, 'text2img'):.3f} | "
                     f"{wins}/{len(seeds)} | {beats}/{len(seeds)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, help="CURVE_DIR:SWEEP_CSV (repeatable).")
    parser.add_argument("--w", default="fit", help="The sweep's w to compare: a number or 'fit'.")
    parser.add_argument("--method", default="finextract", help="The sweep's method (finextract, finextract_caption).")
    args = parser.parse_args(argv)
    points: dict = {}
    for run in args.run:
        curve_dir, sweep_csv = run.split(":", 1)
        points.update(read(f"{curve_dir}/curve.csv", sweep_csv, args.w, args.method))
    print(table(points, f"{args.method} w = {args.w}"))


if __name__ == "__main__":
    main()
