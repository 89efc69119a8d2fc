"""LoRA files made by PEFT/diffusers in PyTorch, loaded by us merged and unmerged, against torch."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file

from finextract_jax.models.pipeline import LORA_FILE, encode_prompts, load_finetuned, tokenize

RANK, ALPHA = 4, 8  # scale alpha/rank = 2: a wrong scale cannot pass
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@pytest.fixture(scope="module")
def peft_lora(tiny_dir, tmp_path_factory):
    """A diffusers-saved PEFT LoRA (rank 4, alpha 8, nonzero B) on UNet and text encoder, and torch outputs."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    tp = StableDiffusionPipeline.from_pretrained(tiny_dir["sd1"], safety_checker=None)
    tp.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=UNET_TARGETS, init_lora_weights=False))
    tp.text_encoder.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TEXT_TARGETS,
                                           init_lora_weights=False))
    out = tmp_path_factory.mktemp("peft_lora")
    unet_sd = get_peft_model_state_dict(tp.unet)
    text_sd = get_peft_model_state_dict(tp.text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        str(out), unet_lora_layers=unet_sd, text_encoder_lora_layers=text_sd, safe_serialization=True,
        unet_lora_adapter_metadata=tp.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=tp.text_encoder.peft_config["default"].to_dict())

    tokenizer = tp.tokenizer
    ids = tokenize(tokenizer, ["a photo of sks dog", ""])
    x = np.random.RandomState(0).randn(2, 4, 8, 8).astype(np.float32)
    t = np.array([20, 640])
    with torch.no_grad():
        context = tp.text_encoder(torch.tensor(ids, dtype=torch.long))[0]
        eps = tp.unet(torch.tensor(x), torch.tensor(t), context).sample.numpy()
    factors = {k: v.detach().numpy() for k, v in unet_sd.items()}
    return {"dir": str(out), "x": x, "t": t, "context": context.numpy(), "eps": eps, "unet_factors": factors,
            "text_factors": {k: v.detach().numpy() for k, v in text_sd.items()}}


def _apply(pipe, x, t, context, gate=None):
    return np.asarray(pipe.unet.module.apply(pipe.unet_variables(), jnp.asarray(x), jnp.asarray(t),
                                             jnp.asarray(context), lora_gate=gate))


def test_merged_lora_matches_peft(tiny_pipe, peft_lora):
    base = tiny_pipe("sd1")
    ft = load_finetuned(base, peft_lora["dir"], lora_mode="merged", cache_dir=None)
    assert ft.unet_lora is None and ft.unet.params is not base.unet.params
    context = np.asarray(encode_prompts(ft.text_encoder, ft.tokenizer, ["a photo of sks dog", ""]))
    assert np.abs(context - peft_lora["context"]).max() <= 1e-4
    eps = _apply(ft, peft_lora["x"], peft_lora["t"], peft_lora["context"])
    base_eps = _apply(base, peft_lora["x"], peft_lora["t"], peft_lora["context"])
    assert np.abs(base_eps - peft_lora["eps"]).max() > 1e-2  # the adapter changes the output
    assert np.abs(eps - peft_lora["eps"]).max() <= 1e-4


def test_unmerged_lora_matches_peft_and_gates_rows(tiny_pipe, peft_lora):
    base = tiny_pipe("sd1")
    ft = load_finetuned(base, peft_lora["dir"], lora_mode="unmerged", cache_dir=None)
    assert ft.unet.params is base.unet.params  # one copy of the base weights
    x, t, context = peft_lora["x"], peft_lora["t"], peft_lora["context"]
    assert np.abs(_apply(ft, x, t, context) - peft_lora["eps"]).max() <= 1e-4
    # One pass over a doubled batch: rows with gate 0 are the pretrained model, gate 1 the fine-tune.
    doubled = _apply(ft, np.concatenate([x, x]), np.concatenate([t, t]), np.concatenate([context, context]),
                     gate=jnp.array([0, 0, 1, 1], jnp.float32))
    assert np.abs(doubled[:2] - _apply(base, x, t, context)).max() <= 1e-5
    assert np.abs(doubled[2:] - peft_lora["eps"]).max() <= 1e-4


def _kohya_file(peft_lora, path):
    """The same factors in kohya naming, with alpha as tensors and no metadata."""
    tensors = {}
    for source, prefix in (("unet_factors", "lora_unet_"), ("text_factors", "lora_te_")):
        for key, value in peft_lora[source].items():
            module, factor = key.rsplit(".lora_", 1)
            module = prefix + module.replace(".", "_")
            tensors[f"{module}.{'lora_down' if factor.startswith('A') else 'lora_up'}.weight"] = value
            tensors[f"{module}.alpha"] = np.array(ALPHA, np.float32)
    save_file(tensors, str(path))
    return str(path)


def test_kohya_keys_give_the_same_tree(tiny_pipe, peft_lora, tmp_path):
    base = tiny_pipe("sd1")
    a = load_finetuned(base, peft_lora["dir"], cache_dir=None)
    b = load_finetuned(base, _kohya_file(peft_lora, tmp_path / "kohya.safetensors"), cache_dir=None)
    for tree_a, tree_b in ((a.unet.params, b.unet.params), (a.text_encoder.params, b.text_encoder.params)):
        fa, fb = flatten_dict(tree_a), flatten_dict(tree_b)
        assert fa.keys() == fb.keys()
        assert max(float(np.abs(np.asarray(fa[k]) - np.asarray(fb[k])).max()) for k in fa) <= 1e-6


def test_lora_without_alpha_assumes_rank_and_says_so(tiny_pipe, peft_lora, tmp_path, caplog):
    tensors = {f"unet.{k}": v for k, v in peft_lora["unet_factors"].items()}
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    base = tiny_pipe("sd1")
    with caplog.at_level("WARNING"):
        ft = load_finetuned(base, str(tmp_path / "bare.safetensors"), lora_mode="unmerged", cache_dir=None)
    assert "assuming alpha = rank" in caplog.text
    key = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_q")
    up = flatten_dict(ft.unet_lora)[key + ("up",)]
    expected = peft_lora["unet_factors"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"].T
    assert np.allclose(np.asarray(up), expected, atol=1e-7)  # scale 1
    assert os.path.basename(LORA_FILE) == "pytorch_lora_weights.safetensors"
