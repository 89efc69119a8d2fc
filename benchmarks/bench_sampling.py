"""Guided-sampling throughput: our fusion strategies vs the reference PyTorch loop, in one run.

    python benchmarks/bench_sampling.py [--size=cpu|sd1] [--batch=4[,8,...]] [--steps=5] [--dtype=float32]
        [--torch] [--mfu] [--variants=two_applies,...] [--flag_sets=default,...] [--baseline=DIR] [--profile=DIR]

--size=tiny: a small UNet at 8x8 latents, for dry runs of every code path.
--size=cpu: an 18M-parameter SD-like UNet at 32x32 latents (the UNet dominates the step).
--size=sd1: the SD 1.x UNet (860M) at 64x64x4 latents, for accelerators.
--size=sdxl_tiny / sdxl_cpu / sdxl: SDXL-shaped pairs (make_tiny --kind=sdxl: two text encoders, text_time
UNet, SDXL conditioning in both loops): the tiny test UNet at 8x8, an SDXL-shaped UNet at 32x32 latents
(channels 64/128/256, no attention at the first level, transformer depths 1/1/2), and the SDXL base UNet
(2.6B) at 128x128x4 latents for accelerators (its add-embedding input is 1568 wide instead of 2816: the
tiny text encoders' pooled width; everything else is SDXL base's config).
--variants: fusion strategies (two_applies, vmap, lora_batch, lora_merged), each optionally with an
attention implementation after a colon (`two_applies:fused`, `two_applies:chunked`, `two_applies:plain`,
`two_applies:cudnn`; default: the library's per-backend choice, `auto`: chunked on CPU, fused elsewhere).
--flag_sets: named XLA flag sets (FLAG_SETS; `default`: the library's, `ynn`: jaxlib's own), each compiled in
its own process (XLA reads its flags once) for the first variant. XLA_FLAGS from the environment applies to every row.
Every row, the PyTorch loop's and the flag sets' included, is timed in --rounds round-robin passes (best
of each), so a shared machine's changing load falls on all rows alike.
--baseline=DIR[,DIR]: other checkouts of the project (e.g. `git archive` of a commit, unpacked), each one more
row in its own process (the first variant, as that checkout computes it): a change timed against the code before it.
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
# SDXL-shaped sizes: overrides of models/tiny.py's SDXL_UNET (its text encoders fix the context width at 80
# for the small ones; the full-size one widens the first text encoder to reach SDXL's 2048).
SDXL_SIZES = {
    "sdxl_tiny": {},
    "sdxl_cpu": dict(block_out_channels=[64, 128, 256], layers_per_block=2, attention_head_dim=[2, 4, 8],
                     transformer_layers_per_block=[1, 1, 2], sample_size=32,
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
    "sdxl": dict(block_out_channels=[320, 640, 1280], layers_per_block=2, attention_head_dim=[5, 10, 20],
                 transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=32 + 6 * 256, sample_size=128,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
}
SIZES.update(SDXL_SIZES)
PEAK_FLOPS = {"bfloat16": {"H100": 989e12, "H200": 989e12, "A100": 312e12},
              "float32": {"H100": 67e12, "H200": 67e12, "A100": 19.5e12}}
# XLA flag sets worth a row (--flag_sets). None changes the arithmetic asked for (no fast-math). On CPU
# jaxlib 0.10 hands convolutions, dots and reductions to YNNPACK fusions; finextract_jax turns that off on
# import (finextract_jax/__init__.py), so `default` is XLA's own emitters and Eigen and `ynn` is jaxlib's
# default; the other sets choose who else runs them: oneDNN, or XNNPACK's greedy graph fusion.
FLAG_SETS = {
    "default": "",
    "ynn": "--xla_cpu_experimental_ynn_fusion_type=+reduce",
    "no_ynn": "--xla_cpu_experimental_ynn_fusion_type=",
    "ynn_no_reduce": "--xla_cpu_experimental_ynn_fusion_type=-reduce",
    "onednn": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=true",
    "xnn_graph": "--xla_cpu_experimental_ynn_fusion_type= "
                 "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "single_thread_eigen": "--xla_cpu_multi_thread_eigen=false",
    "gpu_autotune_0": "--xla_gpu_autotune_level=0",
    "gpu_autotune_4": "--xla_gpu_autotune_level=4",
    "gpu_no_triton_gemm": "--xla_gpu_enable_triton_gemm=false",
}


def make_models(root, size):
    """base/ and full/ pipelines and a rank-64 attention LoRA under root (reused when already there)."""
    from safetensors.numpy import save_file

    from finextract_jax.models import components
    from finextract_jax.models.convert import flax_to_pytorch_key
    from finextract_jax.models.tiny import make_tiny

    overrides = SIZES[size]
    base, full, lora = (os.path.join(root, name) for name in ("base", "full", "lora.safetensors"))
    if os.path.exists(lora):
        return base, full if os.path.isdir(full) else base, lora
    kind = "sdxl" if size in SDXL_SIZES else "latent"
    make_tiny(base, kind=kind, unet_overrides=overrides)
    if size == "sdxl":  # 10 GB of float32 weights: the fine-tune is the same folder (the timing does not
        full = base     # depend on the weights' values; both UNets are still evaluated every step)
    else:
        make_tiny(full, kind=kind, seed=1, unet_overrides=overrides)
    rng = np.random.default_rng(0)
    tensors = {}
    with open(os.path.join(base, "unet", "config.json")) as f:
        config = json.load(f)
    # The attention layers' shapes from the config alone: loading a 2.6B UNet just to name them costs minutes.
    shapes = components.expected_shapes("unet", components.unet_from_config(config), config)
    for key, value in shapes.items():
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


def interleaved_best(timers, rounds, report=None):
    """Best seconds of each timer over `rounds` round-robin passes (one call of every timer per pass), so
    every row sees the same changes in the machine's load; each timer is called once before, untimed.
    `report(round, best)` after each pass: a run cut short by its time limit still leaves figures."""
    for timer in timers:
        timer()
    best = [float("inf")] * len(timers)
    for r in range(rounds):
        for i, timer in enumerate(timers):
            best[i] = min(best[i], timer())
        if report:
            report(r, best)
    return best


def timed(run):
    def timer():
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
    return timer


def _with_flags(inherited: str, flag_set: str) -> str:
    """`inherited` XLA flags plus a set's; the set's YNNPACK choice replaces the inherited one (the library's)."""
    from finextract_jax import YNN_FLAG

    if YNN_FLAG in flag_set:
        inherited = " ".join(f for f in inherited.split() if not f.startswith(YNN_FLAG))
    return f"{inherited} {flag_set}".strip()


def flag_set_env(name: str) -> dict:
    """The environment changes that run a child under the named flag set."""
    if name not in FLAG_SETS:
        raise SystemExit(f"unknown flag set {name}; choose from {', '.join(FLAG_SETS)}")
    return {"XLA_FLAGS": _with_flags(os.environ.get("XLA_FLAGS", ""), FLAG_SETS[name])}


class FlagSetChild:
    """Our first variant compiled under one named XLA flag set, in a child process (XLA reads its flags
    once per process) that times one sampler call each time it is asked, so it joins the interleaved rounds;
    with `tree`, as another checkout of the project (its own benchmarks/bench_sampling.py) computes it."""

    def __init__(self, args, models_root, name, batch, tree=""):
        env = dict(os.environ, **flag_set_env(name))
        script = os.path.join(os.path.abspath(tree), "benchmarks", "bench_sampling.py") if tree else __file__
        command = [sys.executable, os.path.abspath(script), f"--size={args.size}", f"--batch={batch}",
                   f"--steps={args.steps}", f"--dtype={args.dtype}", f"--variants={args.variants.split(',')[0]}",
                   f"--models_dir={models_root}", "--serve"]
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self.process.stdout.readline().strip() == "ready"

    def __call__(self):
        self.process.stdin.write("t\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def serve(compiled, args):
    """--serve: answer each line on stdin with the seconds of one compiled call."""
    import jax

    jax.block_until_ready(compiled(*args))
    print("ready", flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        print(time.perf_counter() - start, flush=True)


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
    added = {k: jax.ShapeDtypeStruct((1, n), jnp.float32) for k, n in (module.added_cond_shapes() or {}).items()}
    lowered = jax.jit(lambda p, x, c, a: module.apply({"params": p}, x, jnp.ones((1,), jnp.int32), c,
                                                      added_cond_kwargs=a or None)).lower(shapes, x, context, added)
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
    rows = lambda c: c.expand(batch, *c.shape[1:]).to(device, torch_dtype)
    if os.path.isdir(os.path.join(base, "text_encoder_2")):  # SDXL: the pipeline's own conditioning
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(base, unet=unet_pre)
        cond, empty, pooled, empty_pooled = pipe.encode_prompt("a photo of sks dog", device="cpu",
                                                               do_classifier_free_guidance=True)
        size = unet_pre.config.sample_size * pipe.vae_scale_factor
        time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=torch.float32,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        kwargs_pre = dict(encoder_hidden_states=rows(empty), added_cond_kwargs={
            "text_embeds": rows(empty_pooled), "time_ids": rows(time_ids)})
        kwargs_ft = dict(encoder_hidden_states=rows(cond), added_cond_kwargs={
            "text_embeds": rows(pooled), "time_ids": rows(time_ids)})
    else:
        tok = CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer"))
        text = CLIPTextModel.from_pretrained(os.path.join(base, "text_encoder")).eval()
        ids = tok(["", "a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        empty, cond = text(ids)[0].chunk(2)
        kwargs_pre, kwargs_ft = dict(encoder_hidden_states=rows(empty)), dict(encoder_hidden_states=rows(cond))
    sched = DDIMScheduler.from_pretrained(os.path.join(base, "scheduler"))
    sched.set_timesteps(steps)
    size = unet_pre.config.sample_size
    x = torch.randn(batch, 4, size, size, device=device, dtype=torch_dtype)

    def loop():
        latents = x
        for t in sched.timesteps:
            eps_pre = unet_pre(latents, t, **kwargs_pre).sample
            eps_ft = unet_ft(latents, t, **kwargs_ft).sample
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="cpu", choices=sorted(SIZES))
    parser.add_argument("--batch", default="4", help="one batch size or a comma-separated list")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--torch", action="store_true", help="also time the PyTorch reference loop")
    parser.add_argument("--mfu", action="store_true")
    parser.add_argument("--variants", default="two_applies,vmap,lora_batch,lora_merged,two_applies:fused")
    parser.add_argument("--flag_sets", default="", help="named XLA flag sets (FLAG_SETS), each in a child process")
    parser.add_argument("--baseline", default="", help="other checkouts of the project (DIR[,DIR]): a row each")
    parser.add_argument("--profile", default="", help="folder for a trace of the first variant (and torch)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing passes over all rows")
    parser.add_argument("--models_dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("FINEXTRACT_CACHE", "")
    batches = [int(b) for b in args.batch.split(",")]

    import jax

    models_root = args.models_dir or tempfile.mkdtemp(prefix="bench_sampling.")
    models = make_models(models_root, args.size)
    if args.serve:
        pre, ft, fusion = flax_pair(args.variants, models, args.dtype, {})
        return serve(*compile_flax(pre, ft, fusion, batches[0], args.steps))
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind} x{len(jax.devices())}; size={args.size} "
          f"batch={args.batch} steps={args.steps} dtype={args.dtype} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
          flush=True)
    names, timers, cache, profiled, children = [], [], {}, None, []
    for batch in batches:
        if args.torch:
            loop = torch_loop(models[0], models[1], batch, args.steps, args.dtype)
            names.append((batch, "pytorch eager loop (reference)"))
            timers.append(timed(loop))
        for variant in args.variants.split(","):
            pre, ft, fusion = flax_pair(variant, models, args.dtype, cache)
            try:
                compiled, call_args = compile_flax(pre, ft, fusion, batch, args.steps)
            except Exception as error:  # an implementation this backend lacks (cuDNN attention on CPU)
                print(f"  batch {batch} {variant}: not available ({type(error).__name__}: {str(error)[:200]})")
                continue
            names.append((batch, variant))
            timers.append(timed(lambda c=compiled, a=call_args: jax.block_until_ready(c(*a))))
            profiled = profiled or (batch, variant, compiled, call_args, args.torch and loop)
        rows = [(name, "", f"{name}: {FLAG_SETS.get(name) or 'no flags'}")
                for name in args.flag_sets.split(",") if name]
        rows += [("default", tree, tree) for tree in args.baseline.split(",") if tree]
        for name, tree, title in rows:
            child = FlagSetChild(args, models_root, name, batch, tree)
            if not child.ready:
                print(f"  batch {batch} {title}: failed to compile", flush=True)
                continue
            children.append(child)
            names.append((batch, f"{args.variants.split(',')[0]} [{title}]"))
            timers.append(child)
        print(f"  batch {batch}: {len(timers)} rows compiled", flush=True)
    report = lambda r, best: print(f"  round {r + 1}: " + "; ".join(
        f"{b} {n} {s / args.steps * 1e3:.1f} ms" for (b, n), s in zip(names, best)), flush=True)
    best = [s / args.steps for s in interleaved_best(timers, args.rounds, report)]
    for child in children:
        child.close()

    peak = next((v for k, v in PEAK_FLOPS[args.dtype].items() if k in device.device_kind), None) if args.mfu else None
    forward_flops = unet_forward_flops(cache[next(iter(cache))]) if peak else None
    reference = {b: s for (b, name), s in zip(names, best) if name.startswith("pytorch")}
    print("\n| batch | variant | ms / guided step | images/s (50 steps) | vs PyTorch | MFU |")
    print("|---|---|---|---|---|---|")
    for (batch, name), step in zip(names, best):
        ratio = f"{reference[batch] / step:.2f}x" if batch in reference else "-"
        mfu = f"{2 * batch * forward_flops / step / peak:.1%}" if forward_flops else "-"
        print(f"| {batch} | {name} | {step * 1e3:.1f} | {batch / (step * 50):.3f} | {ratio} | {mfu} |")
    print(json.dumps({"rows": [(b, n, s) for (b, n), s in zip(names, best)], "unet_forward_flops": forward_flops}))
    if args.profile and profiled:  # last: a run cut short by its time limit has its table already
        print_profiles(args, profiled)


def print_profiles(args, profiled):
    from benchmarks import profiling

    batch, variant, compiled, call_args, loop = profiled
    seconds, parsed = profiling.profile_compiled(compiled, call_args, os.path.join(args.profile, "jax"))
    profiling.print_tables(f"ours ({variant}, batch {batch}), XLA trace", *profiling.jax_table(seconds, parsed),
                           steps=args.steps)
    if loop:
        profiling.print_tables(f"PyTorch eager loop (batch {batch}), torch.profiler",
                               *profiling.torch_table(loop), steps=args.steps)


if __name__ == "__main__":
    main()
