"""Shared fixtures: tiny pipelines are written once per session and reused by every test."""
import os
import tempfile

import pytest

# No converted-weights cache in tests (never the user's).
os.environ.setdefault("FINEXTRACT_CACHE", "")
# One persistent XLA compilation cache for the session, shared with the subprocesses tests start
# (binaries, multi-process runs): they compile the same loops again, and CI's time is bounded.
# Every program is kept, however quick to compile: a binary's start (weight conversion, prompt
# encoding, eager ops) is ~80 small programs, and reading them back saved ~7 s of each warm
# extract run (26.7 -> 19.1 s on 2 shared vCPUs) against a 0.5 s threshold.
_COMPILE_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"finextract_jax_test_xla_{os.getpid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """{name: folder} of tiny random pipelines: sd1/sd2 in PyTorch safetensors, sd1 in Flax msgpack, pixel."""
    from finextract_jax.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {
        "sd1": make_tiny(str(root / "sd1"), fmt="pt"),
        "sd2": make_tiny(str(root / "sd2"), fmt="pt", prediction_type="v_prediction"),
        "sd1_flax": make_tiny(str(root / "sd1_flax"), fmt="flax"),
        "pixel": make_tiny(str(root / "pixel"), kind="pixel", fmt="pt"),
    }


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A tiny random SDXL pipeline (make_tiny --kind=sdxl, PyTorch safetensors)."""
    from finextract_jax.models.tiny import make_tiny

    return make_tiny(str(tmp_path_factory.mktemp("tiny_sdxl") / "sdxl"), kind="sdxl")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_dir):
    """{name: Pipeline} loaded by finextract_jax (float32, no cache)."""
    from finextract_jax.models.pipeline import load_pipeline

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_pipeline(tiny_dir[name], cache_dir=None)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def torch_pipe(tiny_dir):
    """{name: diffusers PyTorch StableDiffusionPipeline} of the same folders."""
    import torch
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = StableDiffusionPipeline.from_pretrained(tiny_dir[name], safety_checker=None)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_finetuned(tiny_dir, tmp_path_factory):
    """Fine-tunes of tiny_dir['sd1']: 'full' (another seed's unet/ + text_encoder/, a partial folder)
    and 'lora' (a PEFT-keyed LoRA file with rank 4, alpha 8, random nonzero factors)."""
    import json
    import shutil

    import numpy as np
    from safetensors.numpy import save_file

    from finextract_jax.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("finetuned")
    other = make_tiny(str(root / "other_seed"), fmt="pt", seed=1)
    full = root / "full"
    full.mkdir()
    for part in ("unet", "text_encoder"):
        shutil.copytree(os.path.join(other, part), full / part)
    rng = np.random.default_rng(0)
    tensors = {}
    for block in ("down_blocks.0", "up_blocks.1"):
        for attn in ("attn1", "attn2"):
            for proj, fan_in in (("to_q", 32), ("to_k", 32), ("to_v", 32), ("to_out.0", 32)):
                if attn == "attn2" and proj in ("to_k", "to_v"):
                    fan_in = 32  # cross_attention_dim of the tiny model
                name = f"unet.{block}.attentions.0.transformer_blocks.0.{attn}.{proj}"
                tensors[f"{name}.lora_A.weight"] = rng.standard_normal((4, fan_in), dtype=np.float32) * 0.3
                tensors[f"{name}.lora_B.weight"] = rng.standard_normal((32, 4), dtype=np.float32) * 0.3
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8})}
    lora = str(root / "lora.safetensors")
    save_file(tensors, lora, metadata=metadata)
    return {"full": str(full), "lora": lora}


def pytest_sessionfinish(session, exitstatus):
    import shutil

    if _COMPILE_CACHE.endswith(f"_{os.getpid()}"):
        shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)
