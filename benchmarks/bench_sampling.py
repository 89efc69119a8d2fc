"""Guided-sampling throughput: our fusion strategies vs the reference PyTorch loop, in one run.

    python benchmarks/bench_sampling.py [--size=cpu|sd1] [--batch=4] [--steps=5] [--dtype=float32]
        [--torch] [--mfu]

--size=cpu: an 18M-parameter SD-like UNet at 32x32 latents (the UNet dominates the step).
--size=sd1: the SD 1.x UNet (860M) at 64x64x4 latents, for accelerators.
Prints one Markdown row per variant: ms per guided step (two UNet evaluations), images/s for a
50-step run, the ratio to the PyTorch loop, and (with --mfu, on a chip in PEAK_FLOPS) the model
FLOPs utilisation: 2 x batch UNet forwards per step (XLA's count of one lowered forward) over the
chip's dense peak. benchmarks/gpu.sh is the prepared accelerator run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = {
    "cpu": dict(block_out_channels=[64, 128, 256], layers_per_block=2, attention_head_dim=8, cross_attention_dim=256,
                down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], sample_size=32),
    "sd1": dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8,
                cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, sample_size=64),
}
PEAK_FLOPS = {"bfloat16": {"H100": 989e12, "H200": 989e12, "A100": 312e12},
              "float32": {"H100": 67e12, "H200": 67e12, "A100": 19.5e12}}


def make_models(root, size):
    from safetensors.numpy import save_file

    from finextract_jax.models.tiny import make_tiny

    overrides = SIZES[size]
    base = make_tiny(os.path.join(root, "base"), unet_overrides=overrides)
    full = make_tiny(os.path.join(root, "full"), seed=1, unet_overrides=overrides)
    rng = np.random.default_rng(0)
    tensors = {}
    from finextract_jax.models.pipeline import load_pipeline

    pipe = load_pipeline(base, cache_dir=None)
    from flax.traverse_util import flatten_dict
    from finextract_jax.models.convert import flax_to_pytorch_key

    for key, value in flatten_dict(pipe.unet.params).items():
        if key[-1] == "kernel" and key[-2] in ("to_q", "to_k", "to_v", "to_out_0"):
            name = "unet." + flax_to_pytorch_key(key)[: -len(".weight")]
            tensors[name + ".lora_A.weight"] = rng.standard_normal((64, value.shape[0]), dtype=np.float32) * 0.01
            tensors[name + ".lora_B.weight"] = rng.standard_normal((value.shape[1], 64), dtype=np.float32) * 0.01
    lora = os.path.join(root, "lora.safetensors")
    save_file(tensors, lora, metadata={"format": "pt"})
    return base, full, lora, pipe


def time_flax(pre, ft, fusion, batch, steps):
    import jax

    from finextract_jax.sampling import engine
    from finextract_jax.sampling.noise import start_noise

    model = engine.prepare(pre, ft, "finextract", "a photo of sks dog", fusion)
    sampler = engine.build_sampler("ddim", pre.scheduler_config, steps)
    run = engine.make_batch_sampler(model, sampler, engine.data_mesh())
    x = start_noise(0, np.arange(batch), pre.sample_shape)
    args = (model.variables, model.contexts, x, 3.0, -0.02)
    compiled = run.lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return min(times) / steps


def unet_forward_flops(pipe):
    """FLOPs of one UNet forward on one image, from XLA's count of the lowered (uncompiled) HLO.

    Why not the compiled sampling loop's cost analysis: on GPU it varied 0.3%-4% 'MFU' between
    variants of the same arithmetic (fusions and the while loop hide work from the count). A guided
    step costs 2 x batch forwards (LoRA factors add < 1%), the same for every variant and for PyTorch.
    """
    import jax
    import jax.numpy as jnp

    module = pipe.unet.module
    shapes = jax.eval_shape(lambda p: p, pipe.unet.params)
    x = jax.ShapeDtypeStruct((1, *pipe.sample_shape), jnp.float32)
    context = jax.ShapeDtypeStruct((1, 77, module.cross_attention_dim), jnp.float32)
    lowered = jax.jit(lambda p, x, c: module.apply({"params": p}, x, jnp.ones((1,), jnp.int32), c)).lower(
        shapes, x, context)
    analysis = lowered.cost_analysis()
    return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


def time_torch(base, full, batch, steps, dtype="float32"):
    """The reference loop: diffusers UNet2DConditionModel, eager, two sequential calls per step (on CUDA when
    torch sees a GPU, in the benchmark's dtype)."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.set_grad_enabled(False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, dtype)
    unet_pre = UNet2DConditionModel.from_pretrained(os.path.join(base, "unet")).eval().to(device, torch_dtype)
    unet_ft = UNet2DConditionModel.from_pretrained(os.path.join(full, "unet")).eval().to(device, torch_dtype)
    tok = CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer"))
    text = CLIPTextModel.from_pretrained(os.path.join(base, "text_encoder")).eval()
    ids = tok(["", "a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    empty, cond = text(ids)[0].chunk(2)
    empty, cond = (c.expand(batch, -1, -1).to(device, torch_dtype) for c in (empty, cond))
    sched = DDIMScheduler.from_pretrained(os.path.join(base, "scheduler"))
    sched.set_timesteps(steps)
    size = unet_pre.config.sample_size
    x = torch.randn(batch, 4, size, size, device=device, dtype=torch_dtype)

    def loop():
        latents = x
        for t in sched.timesteps:
            eps_pre = unet_pre(latents, t, empty).sample
            eps_ft = unet_ft(latents, t, cond).sample
            eps = eps_pre + 3.0 * (eps_ft - eps_pre) - 0.02 * eps_pre
            latents = sched.step(eps, t, latents).prev_sample
        if device == "cuda":
            torch.cuda.synchronize()
        return latents

    loop()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        loop()
        times.append(time.perf_counter() - start)
    return min(times) / steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="cpu", choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--torch", action="store_true", help="also time the PyTorch reference loop")
    parser.add_argument("--mfu", action="store_true")
    parser.add_argument("--variants", default="two_applies,vmap,lora_batch,lora_merged,plain_attention")
    args = parser.parse_args()
    os.environ.setdefault("FINEXTRACT_CACHE", "")

    import jax

    from finextract_jax.models.pipeline import load_finetuned, load_pipeline

    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind} x{len(jax.devices())}; size={args.size} "
          f"batch={args.batch} steps={args.steps} dtype={args.dtype}", flush=True)
    root = tempfile.mkdtemp(prefix="bench_sampling.")
    base, full, lora, _ = make_models(root, args.size)
    pre = load_pipeline(base, dtype=args.dtype, cache_dir=None)
    rows = []
    torch_step = time_torch(base, full, args.batch, args.steps, args.dtype) if args.torch else None
    if torch_step:
        rows.append(("pytorch eager loop (reference)", torch_step))
        print(f"  pytorch: {torch_step * 1e3:.1f} ms/step", flush=True)
    for variant in args.variants.split(","):
        if variant in ("two_applies", "vmap"):
            ft = load_finetuned(pre, full, dtype=args.dtype, cache_dir=None, lora_mode="merged")
            fusion = variant
        elif variant == "plain_attention":
            pre_plain = load_pipeline(base, dtype=args.dtype, attention="plain", cache_dir=None)
            ft = load_finetuned(pre_plain, full, dtype=args.dtype, attention="plain", cache_dir=None)
            rows.append(("two_applies, plain attention", time_flax(pre_plain, ft, "two_applies", args.batch, args.steps)))
            continue
        elif variant == "lora_batch":
            ft = load_finetuned(pre, lora, lora_mode="unmerged", dtype=args.dtype, cache_dir=None)
            fusion = "lora_batch"
        elif variant == "lora_merged":
            ft = load_finetuned(pre, lora, lora_mode="merged", dtype=args.dtype, cache_dir=None)
            fusion = "two_applies"
            variant = "LoRA merged, two_applies"
        else:
            raise SystemExit(f"unknown variant {variant}")
        step = time_flax(pre, ft, fusion, args.batch, args.steps)
        rows.append((variant, step))
        print(f"  {variant}: {step * 1e3:.1f} ms/step", flush=True)

    peak = next((v for k, v in PEAK_FLOPS[args.dtype].items() if k in device.device_kind), None) if args.mfu else None
    step_flops = 2 * args.batch * unet_forward_flops(pre) if peak else None
    print("\n| variant | ms / guided step | images/s (50 steps) | vs PyTorch | MFU |")
    print("|---|---|---|---|---|")
    for name, step in rows:
        ratio = f"{torch_step / step:.2f}x" if torch_step else "-"
        mfu = f"{step_flops / step / peak:.1%}" if step_flops else "-"
        print(f"| {name} | {step * 1e3:.1f} | {args.batch / (step * 50):.3f} | {ratio} | {mfu} |")
    print(json.dumps({"rows": rows, "guided_step_flops": step_flops}))


if __name__ == "__main__":
    main()
