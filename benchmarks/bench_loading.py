"""Checkpoint conversion: time and peak memory to load a PyTorch-safetensors SD folder into Flax,
without the cache, when writing it, and when reading it back.

    python benchmarks/bench_loading.py [--size=cpu|sd1]

Each measurement runs in a fresh subprocess so that peak RSS (ru_maxrss) belongs to it alone.
"""
import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_LOAD = """
import resource, sys, time
t0 = time.perf_counter()
from finextract_jax.models.pipeline import load_pipeline
import jax
t1 = time.perf_counter()
pipe = load_pipeline(sys.argv[1], cache_dir=sys.argv[2] or None)
jax.block_until_ready(pipe.unet.params)
t2 = time.perf_counter()
print(f"{t2 - t1:.2f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="cpu", choices=["cpu", "sd1"])
    args = parser.parse_args()
    from benchmarks.bench_sampling import SIZES
    from finextract_jax.models.tiny import make_tiny

    root = tempfile.mkdtemp(prefix="bench_loading.")
    folder = make_tiny(os.path.join(root, "model"), unet_overrides=SIZES[args.size])
    size_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs) / 2**20
    cache = os.path.join(root, "cache")
    print(f"model: {args.size}, {size_mb:.0f} MiB of safetensors")
    print("| load | seconds | peak RSS (MiB) |\n|---|---|---|")
    for label, cache_dir in (("convert, no cache", ""), ("convert + write cache", cache), ("from cache", cache)):
        out = subprocess.run([sys.executable, "-c", _LOAD, folder, cache_dir], capture_output=True, text=True,
                             env=dict(os.environ, FINEXTRACT_CACHE=""), check=True).stdout.split()
        print(f"| {label} | {out[0]} | {out[1]} |")


if __name__ == "__main__":
    main()
