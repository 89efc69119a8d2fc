"""Shared fixtures: tiny pipelines are written once per session and reused by every test."""
import os

import pytest

# A private converted-weights cache for the test session (never the user's).
os.environ.setdefault("FINEXTRACT_CACHE", "")


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
