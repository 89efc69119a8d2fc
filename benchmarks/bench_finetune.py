"""Fine-tuning throughput: optimizer steps/s of the jitted DreamBooth and LoRA steps.

    python benchmarks/bench_finetune.py [--size=tiny|cpu|sd1] [--methods=dreambooth,lora]
        [--dtypes=float32] [--batch=1] [--steps=20]

--size=tiny: make_tiny's pipeline (the test models: 8x8x4 latents, 16 px images).
--size=cpu / sd1: the UNets of bench_sampling.py (18M at 32x32 latents; SD 1.x's 860M at 64x64x4)
with the tiny VAE and text encoder (the UNet dominates a step). Random weights, no downloads.
Prints one Markdown row per (method, dtype): compile seconds (first step), steps/s and images/s
after it, on whatever devices JAX sees.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _images(folder: str, count: int = 4):
    import skimage.data
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for name in ("astronaut", "coffee", "chelsea", "rocket")[:count]:
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(os.path.join(folder, f"{name}.png"))
    return folder


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="tiny", choices=["tiny", "cpu", "sd1"])
    parser.add_argument("--methods", default="dreambooth,lora")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("FINEXTRACT_CACHE", "")

    import jax

    from finextract_jax.finetune import FinetuneConfig, Trainer, load_train_set
    from finextract_jax.models.pipeline import load_pipeline
    from finextract_jax.models.tiny import make_tiny

    root = tempfile.mkdtemp(prefix="bench_finetune.")
    overrides = None
    if args.size != "tiny":
        from benchmarks.bench_sampling import SIZES

        overrides = SIZES[args.size]
    pipe = load_pipeline(make_tiny(os.path.join(root, "model"), unet_overrides=overrides), cache_dir=None)
    resolution = pipe.unet.module.sample_size * pipe.vae_scale_factor
    train_set = load_train_set(_images(os.path.join(root, "images")), resolution, "a photo of sks dog")
    device = jax.devices()[0]
    print(f"size={args.size} resolution={resolution} batch={args.batch} devices={jax.device_count()} "
          f"({device.platform}: {getattr(device, 'device_kind', '')})")
    print("| method | dtype | compile s | steps/s | images/s |")
    print("|---|---|---|---|---|")
    for method in args.methods.split(","):
        for dtype in args.dtypes.split(","):
            config = FinetuneConfig(method=method, dtype=dtype, batch_size=args.batch, rank=args.rank,
                                    steps=args.steps + 1)
            trainer = Trainer(pipe, train_set, config)
            state = trainer.init_state()
            trainer.data(), trainer.frozen()
            start = time.perf_counter()
            state, metrics = trainer.step(state)
            jax.block_until_ready(metrics["loss"])
            compile_s = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = trainer.step(state)
            jax.block_until_ready((state.trainable, metrics["loss"]))
            rate = args.steps / (time.perf_counter() - start)
            print(f"| {method} | {dtype} | {compile_s:.1f} | {rate:.2f} | {rate * args.batch:.2f} |", flush=True)


if __name__ == "__main__":
    main()
