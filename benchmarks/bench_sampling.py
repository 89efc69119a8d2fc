"""Guided-sampling throughput: our fusion strategies vs the reference PyTorch loop, in one run.

    python benchmarks/bench_sampling.py [--size=cpu|sd1] [--batch=4[,8,...]] [--steps=5] [--dtype=float32]
        [--torch] [--mfu] [--variants=two_applies,...] [--flag_sets=default,...] [--profile=DIR]

--size=tiny: a small UNet at 8x8 latents, for dry runs of every code path.
--size=cpu: an 18M-parameter SD-like UNet at 32x32 latents (the UNet dominates the step).
--size=sd1: the SD 1.x UNet (860M) at 64x64x4 latents, for accelerators.
--variants: fusion strategies (two_applies, vmap, lora_batch, lora_merged), each optionally with an
attention implementation after a colon (`two_applies:plain`, `two_applies:cudnn`; default: the library's
per-backend choice, `auto`).
--flag_sets: named XLA flag sets (FLAG_SETS; `default` = none), each timed in its own process (XLA reads
its flags once) on the first variant, between two timings of the PyTorch loop. XLA_FLAGS from the
environment applies to every row.
--profile=DIR: a jax.profiler trace of the first variant's compiled sampler (and with --torch a PyTorch
profile of the reference loop), reduced to op-category and top-op tables (benchmarks/profiling.py).
Prints one Markdown row per (batch, variant): ms per guided step (two UNet evaluations), images/s for a
50-step run, the ratio to the PyTorch loop, and (with --mfu, on a chip in PEAK_FLOPS) the model FLOPs
utilisation: 2 x batch UNet forwards per step (XLA's count of one lowered forward) over the chip's dense
peak. benchmarks/gpu.sh is the prepared accelerator run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = {
    "tiny": dict(block_out_channels=[64, 64], layers_per_block=1, attention_head_dim=8, cross_attention_dim=64,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], sample_size=8),
    "cpu": dict(block_out_channels=[64, 128, 256], layers_per_block=2, attention_head_dim=8, cross_attention_dim=256,
                down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], sample_size=32),
    "sd1": dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8,
                cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, sample_size=64),
}
PEAK_FLOPS = {"bfloat16": {"H100": 989e12, "H200": 989e12, "A100": 312e12},
              "float32": {"H100": 67e12, "H200": 67e12, "A100": 19.5e12}}
# XLA flag sets worth a row (--flag_sets). Exactness: none of these changes the arithmetic asked for
# (no fast-math); the library-fusion switches choose who runs a convolution or dot (XLA's own emitter,
# YNNPACK, XNNPACK or oneDNN).
FLAG_SETS = {
    "default": "",
    "no_eigen_threads": "--xla_cpu_multi_thread_eigen=false",
    "onednn": "--xla_cpu_use_onednn=true",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "ynn_dot_conv": "--xla_cpu_experimental_ynn_fusion_type=+individual_dot,+individual_convolution",
    "xnn_graph": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "gpu_autotune_0": "--xla_gpu_autotune_level=0",
    "gpu_autotune_4": "--xla_gpu_autotune_level=4",
    "gpu_no_triton_gemm": "--xla_gpu_enable_triton_gemm=false",
    "gpu_cudnn_fmha": "--xla_gpu_enable_cudnn_fmha=true",
}


def make_models(root, size):
    """base/ and full/ pipelines and a rank-64 attention LoRA under root (reused when already there)."""
    from safetensors.numpy import save_file

    from finextract_jax.models.convert import flax_to_pytorch_key
    from finextract_jax.models.pipeline import load_pipeline
    from finextract_jax.models.tiny import make_tiny
    from flax.traverse_util import flatten_dict

    overrides = SIZES[size]
    base, full, lora = (os.path.join(root, name) for name in ("base", "full", "lora.safetensors"))
    if os.path.exists(lora):
        return base, full, lora
    make_tiny(base, unet_overrides=overrides)
    make_tiny(full, seed=1, unet_overrides=overrides)
    rng = np.random.default_rng(0)
    tensors = {}
    for key, value in flatten_dict(load_pipeline(base, cache_dir=None).unet.params).items():
        if key[-1] == "kernel" and key[-2] in ("to_q", "to_k", "to_v", "to_out_0"):
            name = "unet." + flax_to_pytorch_key(key)[: -len(".weight")]
            tensors[name + ".lora_A.weight"] = rng.standard_normal((64, value.shape[0]), dtype=np.float32) * 0.01
            tensors[name + ".lora_B.weight"] = rng.standard_normal((value.shape[1], 64), dtype=np.float32) * 0.01
    save_file(tensors, lora + ".tmp", metadata={"format": "pt"})
    os.replace(lora + ".tmp", lora)
    return base, full, lora


def compile_flax(pre, ft, fusion, batch, steps):
    """(compiled sampler, its arguments) for one fusion strategy."""
    from finextract_jax.sampling import engine
    from finextract_jax.sampling.noise import start_noise

    model = engine.prepare(pre, ft, "finextract", "a photo of sks dog", fusion)
    sampler = engine.build_sampler("ddim", pre.scheduler_config, steps)
    run = engine.make_batch_sampler(model, sampler, engine.data_mesh())
    x = start_noise(0, np.arange(batch), pre.sample_shape)
    args = (model.variables, model.contexts, x, 3.0, -0.02)
    return run.lower(*args).compile(), args


def best_seconds(run, repeats):
    """Best of `repeats` timed calls after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def time_compiled(compiled, args, steps):
    import jax

    return best_seconds(lambda: jax.block_until_ready(compiled(*args)), 3) / steps


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


def torch_loop(base, full, batch, steps, dtype="float32"):
    """The reference loop: diffusers UNet2DConditionModel, eager, two sequential calls per step (on CUDA when
    torch sees a GPU, in the benchmark's dtype). Returns a function running the whole loop once."""
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

    return loop


def flax_pair(variant, models, dtype, cache):
    """(pretrained, fine-tuned, fusion) Pipelines for a variant name `fusion[:attention]`."""
    from finextract_jax.models.pipeline import load_finetuned, load_pipeline

    fusion, _, attention = variant.partition(":")
    attention = attention or "auto"
    base, full, lora = models
    key = (attention,)
    if key not in cache:
        cache[key] = load_pipeline(base, dtype=dtype, attention=attention, cache_dir=None)
    pre = cache[key]
    common = dict(dtype=dtype, attention=attention, cache_dir=None)
    if fusion in ("two_applies", "vmap"):
        return pre, load_finetuned(pre, full, lora_mode="merged", **common), fusion
    if fusion == "lora_batch":
        return pre, load_finetuned(pre, lora, lora_mode="unmerged", **common), fusion
    if fusion == "lora_merged":
        return pre, load_finetuned(pre, lora, lora_mode="merged", **common), "two_applies"
    raise SystemExit(f"unknown variant {variant}")


def flag_set_rows(args, models_root, names):
    """Time the first variant under each named XLA flag set, one child process per set."""
    rows = []
    for name in names:
        if name not in FLAG_SETS:
            raise SystemExit(f"unknown flag set {name}; choose from {', '.join(FLAG_SETS)}")
        env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FLAG_SETS[name]}".strip())
        command = [sys.executable, os.path.abspath(__file__), f"--size={args.size}", f"--batch={args.batch}",
                   f"--steps={args.steps}", f"--dtype={args.dtype}", f"--variants={args.variants.split(',')[0]}",
                   f"--models_dir={models_root}", "--json_only"]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode or not lines:
            print(f"  flag set {name}: failed ({result.stderr.strip().splitlines()[-1:]})", flush=True)
            continue
        for batch, variant, step in json.loads(lines[-1])["rows"]:
            rows.append((batch, f"{variant} [{name}]", step))
            print(f"  [{name}] batch {batch} {variant}: {step * 1e3:.1f} ms/step", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="cpu", choices=sorted(SIZES))
    parser.add_argument("--batch", default="4", help="one batch size or a comma-separated list")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--torch", action="store_true", help="also time the PyTorch reference loop")
    parser.add_argument("--mfu", action="store_true")
    parser.add_argument("--variants", default="two_applies,vmap,lora_batch,lora_merged,two_applies:plain")
    parser.add_argument("--flag_sets", default="", help="named XLA flag sets (FLAG_SETS), each in a child process")
    parser.add_argument("--profile", default="", help="folder for a trace of the first variant (and torch)")
    parser.add_argument("--models_dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--json_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("FINEXTRACT_CACHE", "")
    batches = [int(b) for b in args.batch.split(",")]
    say = (lambda *a, **k: None) if args.json_only else print

    import jax

    device = jax.devices()[0]
    say(f"device: {device.platform} {device.device_kind} x{len(jax.devices())}; size={args.size} "
        f"batch={args.batch} steps={args.steps} dtype={args.dtype} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        flush=True)
    models_root = args.models_dir or tempfile.mkdtemp(prefix="bench_sampling.")
    models = make_models(models_root, args.size)
    loops = {b: torch_loop(models[0], models[1], b, args.steps, args.dtype) for b in batches} if args.torch else {}
    torch_steps = {b: [best_seconds(loop, 2) / args.steps] for b, loop in loops.items()}
    for b, (step,) in torch_steps.items():
        say(f"  batch {b} pytorch: {step * 1e3:.1f} ms/step", flush=True)
    rows, cache, profiled = [], {}, None
    for batch in batches:
        for variant in args.variants.split(","):
            pre, ft, fusion = flax_pair(variant, models, args.dtype, cache)
            try:
                compiled, call_args = compile_flax(pre, ft, fusion, batch, args.steps)
            except Exception as error:  # an implementation this backend lacks (cuDNN attention on CPU)
                say(f"  batch {batch} {variant}: not available ({type(error).__name__}: {str(error)[:200]})")
                continue
            step = time_compiled(compiled, call_args, args.steps)
            rows.append((batch, variant, step))
            say(f"  batch {batch} {variant}: {step * 1e3:.1f} ms/step", flush=True)
            profiled = profiled or (batch, variant, compiled, call_args)
    rows += flag_set_rows(args, models_root, [n for n in args.flag_sets.split(",") if n])
    for b, loop in loops.items():  # again after ours: the machine's load may have changed meanwhile
        torch_steps[b].append(best_seconds(loop, 2) / args.steps)
        say(f"  batch {b} pytorch (again): {torch_steps[b][-1] * 1e3:.1f} ms/step", flush=True)
    if args.json_only:
        print(json.dumps({"rows": rows}))
        return
    if args.profile and profiled:
        print_profiles(args, profiled, loops)

    peak = next((v for k, v in PEAK_FLOPS[args.dtype].items() if k in device.device_kind), None) if args.mfu else None
    forward_flops = unet_forward_flops(cache[next(iter(cache))]) if peak else None
    torch_best = {b: min(s) for b, s in torch_steps.items()}
    print("\n| batch | variant | ms / guided step | images/s (50 steps) | vs PyTorch | MFU |")
    print("|---|---|---|---|---|---|")
    table = [(b, "pytorch eager loop (reference; best of start and end)", s) for b, s in torch_best.items()] + rows
    for batch, name, step in table:
        ratio = f"{torch_best[batch] / step:.2f}x" if batch in torch_best else "-"
        mfu = f"{2 * batch * forward_flops / step / peak:.1%}" if forward_flops else "-"
        print(f"| {batch} | {name} | {step * 1e3:.1f} | {batch / (step * 50):.3f} | {ratio} | {mfu} |")
    print(json.dumps({"rows": table, "torch_start_end": torch_steps, "unet_forward_flops": forward_flops}))


def print_profiles(args, profiled, loops):
    from benchmarks import profiling

    batch, variant, compiled, call_args = profiled
    seconds, parsed = profiling.profile_compiled(compiled, call_args, os.path.join(args.profile, "jax"))
    profiling.print_tables(f"ours ({variant}, batch {batch}), XLA trace", *profiling.jax_table(seconds, parsed),
                           steps=args.steps)
    if batch in loops:
        profiling.print_tables(f"PyTorch eager loop (batch {batch}), torch.profiler",
                               *profiling.torch_table(loops[batch]), steps=args.steps)


if __name__ == "__main__":
    main()
