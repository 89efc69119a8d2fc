"""Adapter formats seen in the wild (kohya LoCon, lora_te1_/te2_, per-module alphas, DoRA, LyCORIS
LoHa/LoKr), each merged by us and compared with PyTorch running the same adapter: diffusers'
`load_lora_weights` reading the very file where diffusers reads that format, else the PEFT model
that made the factors (PEFT implements LyCORIS' LoHa/LoKr and DoRA).

Factors are random and nonzero, alphas differ from ranks, DoRA magnitudes are perturbed away from
the weight norms (PEFT initialises them equal, which would make DoRA plain LoRA): a wrong scale,
axis or layout cannot pass.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from finextract_jax.errors import LoraError
from finextract_jax.models.pipeline import encode_prompts, load_finetuned, tokenize

PROMPTS = ["a photo of sks dog", ""]
FACTOR = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "hada_", "lokr_")
KOHYA_FACTOR = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                "lora_magnitude_vector": "dora_scale"}


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.RandomState(0)
    return {"x": rng.randn(2, 4, 8, 8).astype(np.float32), "t": np.array([20, 640])}


@pytest.fixture(scope="module")
def eps_fn(tiny_pipe):
    """Our UNet as one jitted function of its parameters (every merged tree has the same structure)."""
    module = tiny_pipe("sd1").unet.module
    return jax.jit(lambda params, x, t, c: module.apply({"params": params}, x, t, c))


def _fresh_torch_pipe(tiny_dir):
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    return StableDiffusionPipeline.from_pretrained(tiny_dir["sd1"], safety_checker=None)


def _torch_outputs(tp, inputs):
    ids = torch.tensor(tokenize(tp.tokenizer, PROMPTS), dtype=torch.long)
    with torch.no_grad():
        context = tp.text_encoder(ids)[0]
        eps = tp.unet(torch.tensor(inputs["x"]), torch.tensor(inputs["t"]), context).sample.numpy()
    return context.numpy(), eps


def _compare(ours, base, torch_context, torch_eps, inputs, eps_fn, text=True):
    """Our fine-tune's text encoder and UNet against torch's (UNet fed torch's context: one error at a time)."""
    x, t, context = jnp.asarray(inputs["x"]), jnp.asarray(inputs["t"]), jnp.asarray(torch_context)
    eps = np.asarray(eps_fn(ours.unet.params, x, t, context))
    assert np.abs(np.asarray(eps_fn(base.unet.params, x, t, context)) - torch_eps).max() > 1e-2  # adapter matters
    assert np.abs(eps - torch_eps).max() <= 1e-4
    if text:
        ours_context = np.asarray(encode_prompts(ours.text_encoder, ours.tokenizer, PROMPTS))
        assert np.abs(np.asarray(encode_prompts(base.text_encoder, base.tokenizer, PROMPTS))
                      - torch_context).max() > 1e-3
        assert np.abs(ours_context - torch_context).max() <= 1e-4


def _kohya_name(prefix, module):
    return prefix + module.replace(".", "_")


def _to_kohya(state_dict, prefix, alphas=None):
    """A PEFT state dict ({module}.lora_A.weight, {module}.hada_w1_a, ...) in kohya / LyCORIS spelling,
    with each module's alpha as a `.alpha` tensor."""
    out = {}
    for key, value in state_dict.items():
        cut = min(key.index("." + f) for f in FACTOR if "." + f in key)
        module, factor = key[:cut], key[cut + 1:]
        value = value.detach().numpy() if hasattr(value, "detach") else value
        if factor == "lora_magnitude_vector":  # LyCORIS keeps the norm's axes: [out, 1(, 1, 1)]
            value = value.reshape(-1, *([1] * (1 if value.ndim == 1 else 3)))
        out[f"{_kohya_name(prefix, module)}.{KOHYA_FACTOR.get(factor, factor)}"] = value
        if alphas is not None:
            out[f"{_kohya_name(prefix, module)}.alpha"] = np.array(alphas(module), np.float32)
    return out


# --- kohya LoCon: diffusers reads the file ---------------------------------------------------------

def _locon_file(tp, path):
    """kohya LoCon on every linear and conv layer of the UNet (3x3 convs: down kxk, up 1x1), lora_te1_ on
    every linear layer of the text encoder, per-module alphas. diffusers drops the .alpha of its
    attention-processor modules and text-encoder modules (its alpha_pattern names them wrongly and
    PEFT ignores them), so those carry the file's most common alpha; the rest vary."""
    rng = np.random.default_rng(0)
    tensors = {}
    for prefix, model in (("lora_unet_", tp.unet), ("lora_te1_", tp.text_encoder)):
        for name, layer in model.named_modules():
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            w, rank, key = layer.weight, 4 if prefix == "lora_unet_" else 2, _kohya_name(prefix, name)
            spatial = tuple(w.shape[2:])
            tensors[key + ".lora_down.weight"] = rng.standard_normal((rank, w.shape[1], *spatial), np.float32) * .2
            tensors[key + ".lora_up.weight"] = rng.standard_normal(
                (w.shape[0], rank, *((1, 1) if spatial else ())), np.float32) * .2
            uniform = prefix == "lora_te1_" or ".attn" in name
            tensors[key + ".alpha"] = np.array(8.0 if uniform else rng.choice([1.0, 2.0, 16.0]), np.float32)
    save_file(tensors, str(path))
    return str(path), tensors


def test_kohya_locon_matches_diffusers(tiny_dir, tiny_pipe, inputs, eps_fn, tmp_path):
    tp = _fresh_torch_pipe(tiny_dir)
    file, tensors = _locon_file(tp, tmp_path / "locon.safetensors")
    assert any(v.shape[2:] == (3, 3) for k, v in tensors.items() if k.endswith("lora_down.weight"))
    tp.load_lora_weights(file)
    torch_context, torch_eps = _torch_outputs(tp, inputs)
    base = tiny_pipe("sd1")
    ours = load_finetuned(base, file, lora_mode="unmerged", cache_dir=None)
    assert ours.unet_lora is None  # convolutions cannot run unmerged: merged instead
    _compare(ours, base, torch_context, torch_eps, inputs, eps_fn)


def test_locon_extracts_with_default_fusion(tiny_dir, tmp_path):
    """The extract entry point with its defaults (fusion auto, which loads LoRA unmerged) on a LoCon
    file: merged instead, sampled with two UNet applies."""
    from finextract_jax.sampling.run import ExtractConfig, extract

    file, _ = _locon_file(_fresh_torch_pipe(tiny_dir), tmp_path / "locon.safetensors")
    record = extract(ExtractConfig(pretrained=tiny_dir["sd1"], finetuned=file, prompt="a photo of sks dog",
                                   guidance_scale=5.0, correction=0.0, num_images=2, batch_size=2, steps=3),
                     str(tmp_path / "run"), progress=False)
    assert record["status"] == "complete" and record["fusion"] == "two_applies"
    assert sorted(os.listdir(tmp_path / "run" / "images")) == ["00000.png", "00001.png"]


def test_sdxl_te1_te2_lora_matches_diffusers(tmp_path_factory):
    """lora_te1_ / lora_te2_ on SDXL's two text encoders (the UNet untouched): our prompt encoding
    (both penultimate hidden states, text_encoder_2's projected pooled output) against
    StableDiffusionXLPipeline.encode_prompt with the file loaded."""
    from diffusers import StableDiffusionXLPipeline

    from finextract_jax.models import sdxl
    from finextract_jax.models.pipeline import load_pipeline
    from finextract_jax.models.tiny import make_tiny

    folder = make_tiny(str(tmp_path_factory.mktemp("sdxl") / "base"), kind="sdxl")
    tp = StableDiffusionXLPipeline.from_pretrained(folder)
    rng = np.random.default_rng(5)
    tensors = {}
    for prefix, model in (("lora_te1_", tp.text_encoder), ("lora_te2_", tp.text_encoder_2)):
        for name, layer in model.named_modules():
            if isinstance(layer, torch.nn.Linear) and "text_model.encoder" in name:
                key = _kohya_name(prefix, name)
                tensors[key + ".lora_down.weight"] = rng.standard_normal((2, layer.in_features), np.float32) * .3
                tensors[key + ".lora_up.weight"] = rng.standard_normal((layer.out_features, 2), np.float32) * .3
                tensors[key + ".alpha"] = np.array(4.0, np.float32)
    file = str(tmp_path_factory.mktemp("sdxl_lora") / "te.safetensors")
    save_file(tensors, file)
    tp.load_lora_weights(file)
    with torch.no_grad():
        ref_context, _, ref_pooled, _ = tp.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    base = load_pipeline(folder, cache_dir=None)
    context, pooled = sdxl.encode_prompts(load_finetuned(base, file, cache_dir=None), PROMPTS)
    base_context, base_pooled = sdxl.encode_prompts(base, PROMPTS)
    width_1 = base.text_encoder.config["hidden_size"]
    for ours, original, ref in ((context[..., :width_1], base_context[..., :width_1], ref_context[..., :width_1]),
                                (context[..., width_1:], base_context[..., width_1:], ref_context[..., width_1:]),
                                (pooled, base_pooled, ref_pooled)):
        assert np.abs(np.asarray(original) - ref.numpy()).max() > 1e-2  # each encoder's LoRA matters
        assert np.abs(np.asarray(ours) - ref.numpy()).max() <= 1e-4


# --- per-module alphas: PEFT's rank_pattern / alpha_pattern, and kohya .alpha -----------------------

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
UNET_PATTERNS = dict(rank_pattern={"attn2.to_k": 2, "conv2": 6},
                     alpha_pattern={"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 3, "conv1": 1,
                                    "to_v": 16})
TEXT_PATTERNS = dict(rank_pattern={"fc1": 2}, alpha_pattern={"layers.1.self_attn.k_proj": 1})


def _peft_adapters(tp, config_cls, unet_kwargs, text_kwargs):
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(1)
    tp.unet.add_adapter(config_cls(target_modules=UNET_TARGETS, **unet_kwargs))
    tp.text_encoder.add_adapter(config_cls(target_modules=TEXT_TARGETS, **text_kwargs))
    return get_peft_model_state_dict(tp.unet), get_peft_model_state_dict(tp.text_encoder)


def _peft_alpha(model, module):
    """The alpha PEFT gave one LoRA module (after its alpha_pattern)."""
    return model.get_submodule(module).lora_alpha["default"]


def test_per_module_alphas_match_peft(tiny_dir, tiny_pipe, inputs, eps_fn, tmp_path):
    """diffusers metadata (r, lora_alpha, rank_pattern, alpha_pattern as PEFT matches them) and the same
    factors as a kohya file with one .alpha per module: both give PEFT's outputs."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    tp = _fresh_torch_pipe(tiny_dir)
    unet_sd, text_sd = _peft_adapters(
        tp, LoraConfig, dict(r=4, lora_alpha=8, init_lora_weights=False, **UNET_PATTERNS),
        dict(r=4, lora_alpha=2, init_lora_weights=False, **TEXT_PATTERNS))
    ranks = {p.rsplit(".lora_A", 1)[0]: v.shape[0] for p, v in unet_sd.items() if ".lora_A" in p}
    assert sorted(set(ranks.values())) == [2, 4, 6]
    torch_context, torch_eps = _torch_outputs(tp, inputs)
    folder = tmp_path / "diffusers"
    StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=unet_sd, text_encoder_lora_layers=text_sd, safe_serialization=True,
        unet_lora_adapter_metadata=tp.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=tp.text_encoder.peft_config["default"].to_dict())
    kohya = {**_to_kohya(unet_sd, "lora_unet_", lambda m: _peft_alpha(tp.unet, m)),
             **_to_kohya(text_sd, "lora_te_", lambda m: _peft_alpha(tp.text_encoder, m))}
    assert len({float(v) for k, v in kohya.items() if k.endswith(".alpha")}) == 5  # 1, 2, 3, 8, 16
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    base = tiny_pipe("sd1")
    for source in (str(folder), str(tmp_path / "kohya.safetensors")):
        _compare(load_finetuned(base, source, cache_dir=None), base, torch_context, torch_eps, inputs, eps_fn)


def test_rslora_metadata_matches_peft(tiny_dir, tiny_pipe, inputs, eps_fn, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    tp = _fresh_torch_pipe(tiny_dir)
    unet_sd, _ = _peft_adapters(tp, LoraConfig, dict(r=4, lora_alpha=8, init_lora_weights=False, use_rslora=True),
                                dict(r=4, lora_alpha=8, init_lora_weights=True))
    torch_context, torch_eps = _torch_outputs(tp, inputs)
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=unet_sd, safe_serialization=True,
                                              unet_lora_adapter_metadata=tp.unet.peft_config["default"].to_dict())
    base = tiny_pipe("sd1")
    _compare(load_finetuned(base, str(tmp_path), cache_dir=None), base, torch_context, torch_eps, inputs, eps_fn,
             text=False)


# --- DoRA ------------------------------------------------------------------------------------------

def _perturb_magnitudes(model):
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(0.5 + torch.rand(param.shape, generator=gen))


def test_dora_matches_peft(tiny_dir, tiny_pipe, inputs, eps_fn, tmp_path):
    """PEFT's DoRA (linear, 1x1 and 3x3 convs, text encoder), saved by diffusers (lora_magnitude_vector)
    and in kohya spelling (dora_scale [out, 1, ...])."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    tp = _fresh_torch_pipe(tiny_dir)
    _peft_adapters(tp, LoraConfig, dict(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True),
                   dict(r=4, lora_alpha=4, init_lora_weights=False, use_dora=True))
    _perturb_magnitudes(tp.unet)
    _perturb_magnitudes(tp.text_encoder)
    unet_sd, text_sd = get_peft_model_state_dict(tp.unet), get_peft_model_state_dict(tp.text_encoder)
    assert any(k.endswith("conv1.lora_magnitude_vector") for k in unet_sd)
    torch_context, torch_eps = _torch_outputs(tp, inputs)
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "diffusers"), unet_lora_layers=unet_sd, text_encoder_lora_layers=text_sd,
        safe_serialization=True, unet_lora_adapter_metadata=tp.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=tp.text_encoder.peft_config["default"].to_dict())
    save_file({**_to_kohya(unet_sd, "lora_unet_", lambda m: 8), **_to_kohya(text_sd, "lora_te_", lambda m: 4)},
              str(tmp_path / "kohya.safetensors"))
    base = tiny_pipe("sd1")
    for source in (str(tmp_path / "diffusers"), str(tmp_path / "kohya.safetensors")):
        ours = load_finetuned(base, source, lora_mode="unmerged", cache_dir=None)
        assert ours.unet_lora is None
        _compare(ours, base, torch_context, torch_eps, inputs, eps_fn)


# --- LyCORIS LoHa / LoKr ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, unet_kwargs, text_kwargs", [
    ("loha", dict(r=4, alpha=8, use_effective_conv2d=False), dict(r=2, alpha=1)),
    ("lokr", dict(r=3, alpha=1, use_effective_conv2d=False), dict(r=2, alpha=4)),
])
def test_lycoris_matches_peft(fmt, unet_kwargs, text_kwargs, tiny_dir, tiny_pipe, inputs, eps_fn, tmp_path):
    """PEFT's LoHa/LoKr (its port of LyCORIS) in LyCORIS spelling: kohya module names, hada_*/lokr_*
    factors, one .alpha per module; here 3x3 convolutions are flattened ([out, in*9] factors), the
    layout LyCORIS' own files below do not use (Tucker cores, full 4-D factors)."""
    from peft import LoHaConfig, LoKrConfig

    tp = _fresh_torch_pipe(tiny_dir)
    config_cls = {"loha": LoHaConfig, "lokr": LoKrConfig}[fmt]
    unet_sd, text_sd = _peft_adapters(tp, config_cls, dict(init_weights=False, **unet_kwargs),
                                      dict(init_weights=False, **text_kwargs))
    names = {k.rsplit(".", 1)[-1] for k in unet_sd}
    assert all(n.startswith(fmt[:2] if fmt == "lokr" else "hada") for n in names), names
    torch_context, torch_eps = _torch_outputs(tp, inputs)
    file = str(tmp_path / f"{fmt}.safetensors")
    save_file({**_to_kohya(unet_sd, "lora_unet_", lambda m: unet_kwargs["alpha"]),
               **_to_kohya(text_sd, "lora_te_", lambda m: text_kwargs["alpha"])}, file)
    base = tiny_pipe("sd1")
    _compare(load_finetuned(base, file, lora_mode="unmerged", cache_dir=None), base, torch_context, torch_eps,
             inputs, eps_fn)


# --- LyCORIS itself: its kohya network trained on the diffusers modules, saved by its own save_weights ----

# LyCORIS' "full" preset names time_embedding.linear_1 twice on a diffusers UNet (TimestepEmbedding
# and the name list) and refuses to build; this is that preset without the duplicate.
LYCORIS_PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""


@pytest.mark.parametrize("kwargs, holds", [
    (dict(algo="lora"), lambda f: f["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[2:] == (3, 3)),
    (dict(algo="loha", use_tucker="true"), lambda f: any(k.endswith(".hada_t1") for k in f)),
    # At these widths most LoKr factors are full (no rank: scale 1 whatever .alpha says).
    (dict(algo="lokr"), lambda f: any(k.endswith(".lokr_w2") for k in f)),
    (dict(algo="lokr", network_dim=2, factor="8", decompose_both="true", use_tucker="true"),
     lambda f: any(k.endswith(".lokr_t2") for k in f) and any(k.endswith(".lokr_w1_a") for k in f)),
    (dict(algo="lora", dora_wd="true", wd_on_output="false"),  # dora_scale [1, in(, 1, 1)]
     lambda f: all(v.shape[0] == 1 for k, v in f.items() if k.endswith(".dora_scale"))),
    (dict(algo="loha", dora_wd="true", wd_on_output="true"),  # dora_scale [out, 1(, 1, 1)]
     lambda f: all(v.shape[1] == 1 for k, v in f.items() if k.endswith(".dora_scale"))),
], ids=["locon", "loha-tucker", "lokr-full", "lokr-decomposed-tucker", "dora-per-input", "loha-dora-per-output"])
def test_lycoris_files_match_lycoris(kwargs, holds, tiny_dir, tiny_pipe, inputs, eps_fn, tmp_path):
    from lycoris.kohya import create_network
    from safetensors.numpy import load_file

    tp = _fresh_torch_pipe(tiny_dir)
    (tmp_path / "preset.toml").write_text(LYCORIS_PRESET)
    kwargs = dict(kwargs)
    net = create_network(1.0, kwargs.pop("network_dim", 4), 8, None, tp.text_encoder, tp.unet, conv_dim=4,
                         conv_alpha=2, preset=str(tmp_path / "preset.toml"), **kwargs)
    net.apply_to(tp.text_encoder, tp.unet, apply_text_encoder=True, apply_unet=True)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # LyCORIS starts each update at zero; DoRA scales start at the norms
        for name, param in net.named_parameters():
            noise = torch.rand(param.shape, generator=gen)
            param.copy_(param * (0.5 + noise) if name.endswith("dora_scale") else (noise - 0.5) * 0.6)
    torch_context, torch_eps = _torch_outputs(tp, inputs)
    file = str(tmp_path / "lycoris.safetensors")
    net.save_weights(file, None, {})
    assert holds(load_file(file))
    base = tiny_pipe("sd1")
    _compare(load_finetuned(base, file, cache_dir=None), base, torch_context, torch_eps, inputs, eps_fn)


# --- refusals ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("tensors, match", [
    ({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.ones((2, 32), np.float32),
      "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": np.ones((32, 2), np.float32)},
     "second text encoder .*lora_te2_.*SDXL"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight": np.ones((2, 2, 3, 3), np.float32)},
     r"lora_mid"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.oft_blocks": np.ones((4, 8, 8), np.float32)}, "OFT"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": np.ones((32, 2), np.float32),
      "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_b": np.ones((2, 288), np.float32)},
     "incomplete set of LoHa factors"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": np.ones((32, 2), np.float32),
      "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": np.ones((2, 32, 3, 3), np.float32)},
     "form no LoRA, LoHa or LoKr"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lokr_w1": np.ones((4, 4), np.float32),
      "lora_unet_down_blocks_0_resnets_0_conv1.lokr_w2": np.ones((8, 4, 3, 3), np.float32)},
     "does not fit the base layer"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": np.ones((2, 32, 3, 3), np.float32),
      "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": np.ones((32, 2, 1, 1), np.float32),
      "lora_unet_down_blocks_0_resnets_0_conv1.dora_scale": np.ones((1, 32, 3, 1), np.float32)}, "dora_scale"),
])
def test_unsupported_or_broken_adapters_are_refused_by_name(tiny_pipe, tmp_path, tensors, match):
    file = str(tmp_path / "adapter.safetensors")
    save_file(tensors, file)
    with pytest.raises(LoraError, match=match):
        load_finetuned(tiny_pipe("sd1"), file, cache_dir=None)


# --- PEFT's own saves: adapter_model.safetensors + adapter_config.json -------------------------------

def _peft_models(tp, config_cls, unet_kwargs, text_kwargs=None):
    """PeftModels around the torch pipeline's UNet (and text encoder), LoRA layers injected in place."""
    from peft import get_peft_model

    torch.manual_seed(1)
    unet = get_peft_model(tp.unet, config_cls(target_modules=UNET_TARGETS, **unet_kwargs))
    text = get_peft_model(tp.text_encoder, config_cls(target_modules=TEXT_TARGETS, **text_kwargs)) \
        if text_kwargs else None
    return unet, text


def test_peft_save_pretrained_folders_match_peft(tiny_dir, tiny_pipe, inputs, eps_fn, tmp_path):
    """PEFT's save_pretrained of the UNet and the text encoder, as a DreamBooth script writes them
    (unet/ and text_encoder/ subfolders), alpha != r, rank_pattern and alpha_pattern entries: the scales
    come from adapter_config.json. Each subfolder alone also loads (its model named by the folder or,
    renamed, by its keys)."""
    import json
    import shutil

    from peft import LoraConfig

    tp = _fresh_torch_pipe(tiny_dir)
    unet, text = _peft_models(tp, LoraConfig, dict(r=4, lora_alpha=6, init_lora_weights=False, **UNET_PATTERNS),
                              dict(r=4, lora_alpha=2, init_lora_weights=False, **TEXT_PATTERNS))
    torch_context, torch_eps = _torch_outputs(tp, inputs)
    unet.save_pretrained(str(tmp_path / "run" / "unet"))
    text.save_pretrained(str(tmp_path / "run" / "text_encoder"))
    saved = json.loads((tmp_path / "run" / "unet" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["alpha_pattern"]["to_v"]) == (4, 6, 16)
    base = tiny_pipe("sd1")
    ours = load_finetuned(base, str(tmp_path / "run"), cache_dir=None)
    _compare(ours, base, torch_context, torch_eps, inputs, eps_fn)
    shutil.copytree(tmp_path / "run" / "text_encoder", tmp_path / "te_renamed")
    for alone, part in ((tmp_path / "run" / "unet", "unet"), (tmp_path / "te_renamed", "text_encoder")):
        one = load_finetuned(base, str(alone), cache_dir=None)
        assert getattr(one, part).params is not getattr(base, part).params
        np.testing.assert_allclose(np.asarray(jax.tree_util.tree_leaves(getattr(one, part).params)[0]),
                                   np.asarray(jax.tree_util.tree_leaves(getattr(ours, part).params)[0]), atol=1e-6)
    # Without its config a PEFT file has no alpha: alpha = rank, said in the log, a different model.
    (tmp_path / "run" / "unet" / "adapter_config.json").unlink()
    bare = load_finetuned(base, str(tmp_path / "run" / "unet" / "adapter_model.safetensors"), cache_dir=None)
    eps = eps_fn(bare.unet.params, jnp.asarray(inputs["x"]), jnp.asarray(inputs["t"]), jnp.asarray(torch_context))
    assert np.abs(np.asarray(eps) - torch_eps).max() > 1e-3


@pytest.mark.parametrize("config, kwargs", [
    ("LoraConfig", dict(r=4, lora_alpha=3, use_rslora=True, use_dora=True, init_lora_weights=False)),
    ("LoHaConfig", dict(r=3, alpha=5, init_weights=False)),
    # r large enough that PEFT keeps both Kronecker factors whole: scale alpha / r all the same.
    ("LoKrConfig", dict(r=16, alpha=2, init_weights=False)),
], ids=["rslora-dora", "loha", "lokr-undecomposed"])
def test_peft_adapter_types_match_peft(config, kwargs, tiny_dir, tiny_pipe, inputs, eps_fn, tmp_path):
    import peft

    tp = _fresh_torch_pipe(tiny_dir)
    unet, _ = _peft_models(tp, getattr(peft, config), kwargs)
    _perturb_magnitudes(tp.unet)
    torch_context, torch_eps = _torch_outputs(tp, inputs)
    unet.save_pretrained(str(tmp_path / "adapter"))
    if config == "LoKrConfig":
        from safetensors.numpy import load_file

        assert not any(k.endswith(("_a", "_b")) for k in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    base = tiny_pipe("sd1")
    _compare(load_finetuned(base, str(tmp_path / "adapter"), cache_dir=None), base, torch_context, torch_eps, inputs,
             eps_fn, text=False)


def test_diffusers_save_lora_adapter_bare_metadata(tiny_dir, tiny_pipe, inputs, eps_fn, tmp_path):
    """diffusers' model-level save_lora_adapter: keys and lora_adapter_metadata without a unet. prefix."""
    from peft import LoraConfig

    tp = _fresh_torch_pipe(tiny_dir)
    tp.unet.add_adapter(LoraConfig(r=4, lora_alpha=12, target_modules=UNET_TARGETS, init_lora_weights=False,
                                   rank_pattern={"conv2": 2}))
    torch_context, torch_eps = _torch_outputs(tp, inputs)
    tp.unet.save_lora_adapter(str(tmp_path))
    base = tiny_pipe("sd1")
    _compare(load_finetuned(base, str(tmp_path), cache_dir=None), base, torch_context, torch_eps, inputs, eps_fn,
             text=False)


@pytest.mark.parametrize("change, match", [
    (dict(peft_type="IA3"), "PEFT IA3 adapter"),
    (dict(modules_to_save=["conv_out"]), "modules_to_save"),
    (dict(bias="lora_only"), "trains biases"),
])
def test_peft_configs_we_cannot_apply_are_refused(tiny_pipe, tmp_path, change, match):
    import json

    save_file({"base_model.model.conv_in.lora_A.weight": np.ones((2, 4, 3, 3), np.float32),
               "base_model.model.conv_in.lora_B.weight": np.ones((32, 2, 1, 1), np.float32)},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(dict(peft_type="LORA", r=2, lora_alpha=4), **change)))
    with pytest.raises(LoraError, match=match):
        load_finetuned(tiny_pipe("sd1"), str(tmp_path), cache_dir=None)
