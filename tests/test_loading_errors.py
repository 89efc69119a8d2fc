"""Bad checkpoints give typed errors that name the path; nothing is cached from a failed load."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from finextract_jax.errors import CheckpointError, ConfigMismatchError, LoraError
from finextract_jax.models.pipeline import load_finetuned, load_pipeline


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="nope.*not found"):
        load_pipeline(str(tmp_path / "nope"), cache_dir=None)


def test_folder_without_unet(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no unet/"):
        load_pipeline(str(tmp_path / "empty"), cache_dir=None)


def test_finetuned_folder_without_unet_or_lora(tiny_pipe, tmp_path):
    (tmp_path / "ft").mkdir()
    with pytest.raises(CheckpointError, match="neither unet/ nor pytorch_lora_weights"):
        load_finetuned(tiny_pipe("sd1"), str(tmp_path / "ft"), cache_dir=None)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_leaves_no_cache(tiny_dir, tmp_path, damage):
    folder = _copy(tiny_dir["sd1"], tmp_path / "model")
    weights = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    data = open(weights, "rb").read()
    with open(weights, "wb") as f:
        f.write(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors.*not a valid safetensors"):
        load_pipeline(folder, cache_dir=str(cache))
    # The other components converted fine, but a failed load caches nothing.
    assert not cache.exists() or os.listdir(cache) == []


def test_config_mismatch_names_the_field(tiny_pipe, tiny_dir, tmp_path):
    folder = _copy(tiny_dir["sd2"], tmp_path / "other")
    with pytest.raises(ConfigMismatchError, match="use_linear_projection"):
        load_finetuned(tiny_pipe("sd1"), folder, cache_dir=None)


def test_weights_that_do_not_fit_config(tiny_dir, tmp_path):
    folder = _copy(tiny_dir["sd1"], tmp_path / "model")
    config_path = os.path.join(folder, "unet", "config.json")
    config = json.load(open(config_path))
    config["cross_attention_dim"] = 64
    json.dump(config, open(config_path, "w"))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_pipeline(folder, cache_dir=None)


def test_refuses_configs_flax_would_misbuild(tiny_dir, tmp_path):
    folder = _copy(tiny_dir["sd1"], tmp_path / "model")
    config_path = os.path.join(folder, "unet", "config.json")
    config = json.load(open(config_path))
    config["class_embed_type"] = "timestep"
    json.dump(config, open(config_path, "w"))
    with pytest.raises(CheckpointError, match="class_embed_type"):
        load_pipeline(folder, cache_dir=None)


def test_lora_keys_matching_no_module(tiny_pipe, tmp_path):
    path = str(tmp_path / "alien.safetensors")
    save_file({"unet.foo_blocks.0.attn9.to_q.lora_A.weight": np.ones((4, 32), np.float32),
               "unet.foo_blocks.0.attn9.to_q.lora_B.weight": np.ones((32, 4), np.float32)}, path)
    with pytest.raises(LoraError, match="match no layer.*foo_blocks"):
        load_finetuned(tiny_pipe("sd1"), path, cache_dir=None)


def test_lora_shape_mismatch(tiny_pipe, tmp_path):
    path = str(tmp_path / "wrong.safetensors")
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{module}.lora_A.weight": np.ones((4, 48), np.float32),
               f"{module}.lora_B.weight": np.ones((32, 4), np.float32)}, path)
    with pytest.raises(LoraError, match="do not fit the base layer"):
        load_finetuned(tiny_pipe("sd1"), path, cache_dir=None)


def test_pickled_ckpt_refused_without_allow_pickle(tiny_pipe, tmp_path):
    import torch

    path = str(tmp_path / "model.ckpt")
    torch.save({"unet.x.lora_A.weight": torch.ones(2, 2)}, path)
    with pytest.raises(CheckpointError, match="--allow_pickle"):
        load_finetuned(tiny_pipe("sd1"), path, finetuned_format="lora", cache_dir=None)


def test_bin_weights_load_weights_only(tiny_dir, tiny_pipe, tmp_path):
    """A .bin UNet (torch pickle) is read with weights_only=True and gives the same parameters."""
    import torch
    from safetensors.numpy import load_file

    folder = _copy(tiny_dir["sd1"], tmp_path / "model")
    st = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    torch.save({k: torch.tensor(v) for k, v in load_file(st).items()},
               os.path.join(folder, "unet", "diffusion_pytorch_model.bin"))
    os.remove(st)
    from flax.traverse_util import flatten_dict

    a = flatten_dict(load_pipeline(folder, cache_dir=None).unet.params)
    b = flatten_dict(tiny_pipe("sd1").unet.params)
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in b)


def test_cache_is_used_and_never_stale(tiny_dir, tmp_path):
    folder = _copy(tiny_dir["sd1"], tmp_path / "model")
    cache = str(tmp_path / "cache")
    first = load_pipeline(folder, cache_dir=cache)
    entries = sorted(e for e in os.listdir(cache) if not e.startswith("."))
    assert len(entries) == 3  # unet, text encoder, vae
    second = load_pipeline(folder, cache_dir=cache)
    from flax.traverse_util import flatten_dict

    a, b = flatten_dict(first.unet.params), flatten_dict(second.unet.params)
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    # Rewrite the UNet with other weights: the old entry must not be served.
    from finextract_jax.models.tiny import init_unet, unet_config, write_component, unet_file_config

    write_component(os.path.join(folder, "unet"), "unet", unet_file_config(unet_config()), init_unet(unet_config(), 7),
                    "pt")
    third = load_pipeline(folder, cache_dir=cache)
    c = flatten_dict(third.unet.params)
    assert any(not np.array_equal(np.asarray(a[k]), np.asarray(c[k])) for k in a)


_NO_TORCH = """
import importlib.abc, importlib.machinery, sys
class _Refuse(importlib.abc.Loader):
    def create_module(self, spec):
        raise ImportError("torch is not installed (simulated)")
    def exec_module(self, module):
        pass
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            return importlib.machinery.ModuleSpec(name, _Refuse())
sys.meta_path.insert(0, NoTorch())
"""


def test_loading_safetensors_needs_no_torch(tiny_dir):
    """As on a machine without torch: USE_TORCH=0 tells diffusers/transformers (which import torch
    whenever it is installed) not to, and every `import torch` fails; the whole pipeline still loads."""
    code = _NO_TORCH + ("from finextract_jax.models.pipeline import load_pipeline, encode_prompts\n"
                        f"p = load_pipeline({tiny_dir['sd1']!r}, cache_dir=None)\n"
                        "encode_prompts(p.text_encoder, p.tokenizer, ['a dog'])\n"
                        "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, USE_TORCH="0"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
