"""Single-file checkpoints in the original SD layout (models/single_file.py).

The files are written from tiny diffusers folders by this test's own inverse map (diffusers ->
LDM names, every key); diffusers' `from_single_file` must load them back to the folder's exact
weights (so the files are what that loader reads), and ours must load the same trees."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from finextract_jax.errors import CheckpointError
from finextract_jax.models import configs, single_file, single_file_configs
from finextract_jax.models.convert import flax_to_pytorch
from finextract_jax.models.pipeline import detect_format, load_finetuned, load_pipeline
from finextract_jax.models.weights import read_safetensors

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest):
    name, leaf = rest.split(".", 1)
    return f"{_RESNET[name]}.{leaf}"


def ldm_unet_key(key, layers, attention_blocks):
    """diffusers UNet name -> original name (written here from the LDM layout, not from our loader)."""
    for new, old in _UNET_TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)$", key):
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + b * (layers + 1) + (layers if kind == "downsamplers" else i)
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{index}.1.{rest}"
        return f"input_blocks.{index}.0.op.{rest.split('.', 1)[1]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", key):
        return f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}" if m[1] == "resnets" else f"middle_block.1.{m[3]}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)$", key)
    b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
    if kind == "upsamplers":
        slot = 2 if b in attention_blocks else 1
        return f"output_blocks.{b * (layers + 1) + layers}.{slot}.{rest}"
    index = b * (layers + 1) + i
    return f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"


def ldm_vae_key(key, levels):
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", key)
    key = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    for new, old in _VAE_ATTENTION.items():
        key = key.replace(f"mid_block.attentions.0.{new}.", f"mid.attn_1.{old}.")
    return key


def open_clip_state(text, extra_layer_rng=None, prefix=single_file.OPEN_CLIP_PREFIX):
    """transformers CLIP names -> OpenCLIP names (q, k, v fused), plus text_projection (x @ P: the
    transpose of CLIPTextModelWithProjection's, else an unused identity); with `extra_layer_rng`, one
    more resblock (SD 2.x files hold 24, the model uses 23)."""
    out = {"token_embedding.weight": text["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": text["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": text["text_model.final_layer_norm.weight"],
           "ln_final.bias": text["text_model.final_layer_norm.bias"]}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    layers = sorted({int(k.split(".")[3]) for k in text if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        src = f"text_model.encoder.layers.{i}."
        for leaf in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{leaf}"] = np.concatenate(
                [text[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            for new, old in names.items():
                out[f"transformer.resblocks.{i}.{old}.{leaf}"] = text[f"{src}{new}.{leaf}"]
    hidden = out["token_embedding.weight"].shape[1]
    out["text_projection"] = text["text_projection.weight"].T if "text_projection.weight" in text else \
        np.eye(hidden, dtype=out["token_embedding.weight"].dtype)
    out["logit_scale"] = np.array(4.6, np.float32)
    if extra_layer_rng is not None:
        last = len(layers)
        for key in [k for k in out if k.startswith(f"transformer.resblocks.{last - 1}.")]:
            out[key.replace(f".{last - 1}.", f".{last}.")] = extra_layer_rng.standard_normal(
                out[key].shape).astype(out[key].dtype)
    return {prefix + k: v for k, v in out.items()}


def to_ldm(unet, unet_config, vae, vae_config, text, open_clip=False, extra_layer_rng=None, text_2=None):
    """diffusers/transformers-named state dicts -> one original-layout state dict; with `text_2`,
    SDXL's (SGM) layout: CLIP-L and OpenCLIP-G under conditioner.embedders.0/1."""
    attention_blocks = {i for i, t in enumerate(unet_config["up_block_types"]) if t.startswith("CrossAttn")}
    state = {single_file.UNET_PREFIX + ldm_unet_key(k, unet_config["layers_per_block"], attention_blocks): v
             for k, v in unet.items()}
    levels = len(vae_config["block_out_channels"])
    for k, v in vae.items():
        new = ldm_vae_key(k, levels)
        state[single_file.VAE_PREFIX + new] = v[:, :, None, None] if ".attn_1." in new and v.ndim == 2 else v
    if text_2 is not None:
        state.update({single_file.SDXL_CLIP_PREFIX + k: v for k, v in text.items()})
        state.update(open_clip_state(text_2, prefix=single_file.SDXL_OPEN_CLIP_PREFIX))
    elif open_clip:
        state.update(open_clip_state(text, extra_layer_rng))
    else:
        state.update({single_file.CLIP_PREFIX + k: v for k, v in text.items()})
    return state


def write_single_file(folder, path, open_clip=False, extra_layer=False):
    """The diffusers folder's weights as one original-layout .safetensors file, its tokenizer/
    beside it (a single file holds none)."""
    import shutil

    from safetensors.numpy import save_file

    sdxl = os.path.isdir(os.path.join(folder, "text_encoder_2"))
    for tokenizer in ("tokenizer", "tokenizer_2") if sdxl else ("tokenizer",):
        shutil.copytree(os.path.join(folder, tokenizer), os.path.join(os.path.dirname(path), tokenizer),
                        dirs_exist_ok=True)
    read = lambda part, name: read_safetensors(os.path.join(folder, part, name))[0]
    config = lambda part: json.load(open(os.path.join(folder, part, "config.json")))
    state = to_ldm(read("unet", "diffusion_pytorch_model.safetensors"), config("unet"),
                   read("vae", "diffusion_pytorch_model.safetensors"), config("vae"),
                   read("text_encoder", "model.safetensors"), open_clip,
                   np.random.default_rng(0) if extra_layer else None,
                   read("text_encoder_2", "model.safetensors") if sdxl else None)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
    return path


@pytest.fixture(scope="module")
def folders(tiny_dir, tiny_sdxl_dir):
    return {"sd1": tiny_dir["sd1"], "sd2": tiny_dir["sd2"], "sdxl": tiny_sdxl_dir}


@pytest.fixture(scope="module")
def files(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    for name in folders:
        (root / name).mkdir()
    return {"sd1": write_single_file(folders["sd1"], str(root / "sd1" / "sd1.safetensors")),
            "sd2": write_single_file(folders["sd2"], str(root / "sd2" / "sd2.safetensors"), open_clip=True,
                                     extra_layer=True),
            "sdxl": write_single_file(folders["sdxl"], str(root / "sdxl" / "sdxl.safetensors"))}


@pytest.fixture(scope="module")
def loaded(folders):
    """{name: our Pipeline of the diffusers folder}."""
    return {name: load_pipeline(folder, cache_dir=None) for name, folder in folders.items()}


def _torch_state(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items() if not k.endswith("position_ids")}


def _flat_pytorch(component, vae=False):
    return flax_to_pytorch(flatten_dict(component.params), vae=vae)


def _assert_same_weights(ours: dict, want: dict, what: str):
    assert ours.keys() == want.keys(), what
    for key in want:
        np.testing.assert_array_equal(ours[key], want[key], err_msg=f"{what} {key}")


@pytest.fixture(scope="module")
def diffusers_loaded(files, folders):
    """{name: StableDiffusion(XL)Pipeline.from_single_file of files[name]} (configs from the folder)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return {name: (StableDiffusionXLPipeline.from_single_file(files[name], config=folders[name], local_files_only=True)
                   if name == "sdxl" else StableDiffusionPipeline.from_single_file(
                       files[name], config=folders[name], local_files_only=True, safety_checker=None))
            for name in files}


def _parts(name):
    return ("unet", "vae", "text_encoder", "text_encoder_2") if name == "sdxl" else ("unet", "vae", "text_encoder")


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_diffusers_from_single_file_reads_our_files_back_to_the_folder(diffusers_loaded, folders, name):
    """The inverse map above is right: diffusers' own single-file loader recovers every weight."""
    from diffusers import DiffusionPipeline

    folder = DiffusionPipeline.from_pretrained(folders[name])
    for part in _parts(name):
        _assert_same_weights(_torch_state(getattr(diffusers_loaded[name], part)),
                             _torch_state(getattr(folder, part)), part)


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_our_trees_equal_diffusers_single_file_weights(files, loaded, diffusers_loaded, name):
    """As the fine-tuned model (configs from the pretrained folder) and as the pretrained model
    (configs read off the shapes): every weight equals what diffusers loads from the same file."""
    folder = loaded[name]
    finetuned = load_finetuned(folder, files[name], cache_dir=None)
    assert detect_format(files[name]) == "single_file"
    reference = diffusers_loaded[name]
    pretrained = load_pipeline(files[name], cache_dir=None)
    for model, parts in ((finetuned, [p for p in _parts(name) if p != "vae"]), (pretrained, _parts(name))):
        for part in parts:
            _assert_same_weights(_flat_pytorch(getattr(model, part), vae=part == "vae"),
                                 _torch_state(getattr(reference, part)), part)
            assert getattr(model, part).source == files[name]
    for field in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                  "cross_attention_dim", "in_channels", "out_channels", "addition_embed_type",
                  "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        assert pretrained.unet.config.get(field) == folder.unet.config.get(field), field
    # Everything but the head counts (not in the weights: SD's conventions give the tiny models others).
    assert [d.split(":")[0] for d in configs.differences("unet", folder.unet.config, pretrained.unet.config)] == \
        ["attention_heads"]
    assert pretrained.unet.config["use_linear_projection"] == (name != "sd1")
    assert pretrained.prediction_type == ("v_prediction" if name == "sd2" else "epsilon")
    assert pretrained.latent_scale == folder.latent_scale
    assert pretrained.force_zeros_for_empty_prompt == folder.force_zeros_for_empty_prompt
    if name == "sdxl":
        assert pretrained.text_encoder_2.config["architectures"] == ["CLIPTextModelWithProjection"]
        assert pretrained.text_encoder_2.config["projection_dim"] == folder.text_encoder_2.config["projection_dim"]
        assert pretrained.tokenizer_2.pad_token == "!" and pretrained.scheduler_config["_class_name"] == \
            "EulerDiscreteScheduler"


def test_sd2_prediction_type_from_sidecar(tiny_dir, tmp_path):
    """An LDM config beside the file sets the prediction type (without one, SD 2.x is v-prediction)."""
    path = write_single_file(tiny_dir["sd2"], str(tmp_path / "m.safetensors"), open_clip=True, extra_layer=True)
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    assert load_pipeline(path, cache_dir=None).prediction_type == "epsilon"
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert load_pipeline(path, cache_dir=None).prediction_type == "v_prediction"


def test_refusals(files, loaded, tiny_dir, tiny_pipe, tmp_path):
    from safetensors.numpy import save_file

    # A fine-tune of another architecture: its weights do not fit the pretrained configs.
    with pytest.raises(CheckpointError, match="not a fine-tune of the pretrained model"):
        load_finetuned(tiny_pipe("sd1"), files["sd2"], cache_dir=None)
    # An SDXL refiner's layout (OpenCLIP-G alone, as embedder 0) is named, not mis-read.
    xl = str(tmp_path / "xl.safetensors")
    save_file({"model.diffusion_model.x": np.zeros(1, np.float32),
               "conditioner.embedders.0.model.x": np.zeros(1, np.float32)}, xl)
    with pytest.raises(CheckpointError, match="SDXL refiners are not supported"):
        load_pipeline(xl, cache_dir=None)
    # SD 1.x weights as a fine-tune of SDXL, and SDXL's as a fine-tune of SD 1.x.
    with pytest.raises(CheckpointError, match="not a fine-tune of the pretrained model"):
        load_finetuned(loaded["sdxl"], files["sd1"], cache_dir=None)
    with pytest.raises(CheckpointError, match="not a fine-tune of the pretrained model"):
        load_finetuned(tiny_pipe("sd1"), files["sdxl"], cache_dir=None)
    # A pickled checkpoint only with allow_pickle, and then weights-only.
    import torch

    state, _ = read_safetensors(files["sd1"])
    ckpt = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, "global_step": 1}, ckpt)
    with pytest.raises(CheckpointError, match="--allow_pickle"):
        load_finetuned(tiny_pipe("sd1"), ckpt, cache_dir=None)
    tuned = load_finetuned(tiny_pipe("sd1"), ckpt, allow_pickle=True, cache_dir=None)
    np.testing.assert_array_equal(
        np.asarray(tuned.unet.params["conv_in"]["kernel"]),
        np.asarray(load_finetuned(tiny_pipe("sd1"), files["sd1"], cache_dir=None).unet.params["conv_in"]["kernel"]))


def _extract(tiny_dir, finetuned, workdir, *extra):
    cmd = [sys.executable, "-m", "experiments.extract", f"--pretrained={tiny_dir['sd1']}", f"--finetuned={finetuned}",
           f"--workdir={workdir}", "--num_images=2", "--batch_size=2", "--steps=2", "--prompt=a photo", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_extract_cli_with_single_file_finetuned(files, tiny_dir, tmp_path):
    """extract through the binary: a folder --pretrained and an original-layout --finetuned; a
    .ckpt of the same weights is refused without --allow_pickle, and gives the same images with it."""
    import torch

    result = _extract(tiny_dir, files["sd1"], tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "run" / "images")) == ["00000.png", "00001.png"]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "complete"
    state, _ = read_safetensors(files["sd1"])
    ckpt = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state.items()}}, ckpt)
    refused = _extract(tiny_dir, ckpt, tmp_path / "refused")
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1 and "--allow_pickle" in refused.stderr
    # Allowed, in-process (a third binary start costs more than the run): the same images.
    from finextract_jax.sampling.run import ExtractConfig, extract

    extract(ExtractConfig(pretrained=tiny_dir["sd1"], finetuned=ckpt, prompt="a photo", num_images=2, batch_size=2,
                          steps=2), str(tmp_path / "pickle"), progress=False, allow_pickle=True)
    for name in ("00000.png", "00001.png"):
        assert (tmp_path / "pickle" / "images" / name).read_bytes() == (tmp_path / "run" / "images" / name).read_bytes()


@pytest.mark.parametrize("family,unet,vae,text", [
    ("sd1", "sd15_unet.json", "sd14_vae.json", "sd14_text_encoder.json"),
    ("sd2base", "sd20base_unet.json", "sd20base_vae.json", "sd20base_text_encoder.json"),
    ("sd2", "sd21_unet.json", "sd21_vae.json", "sd21_text_encoder.json"),
    ("sdxl", "sdxl_unet.json", "sdxl_vae.json", "sdxl_text_encoder.json")])
def test_configs_inferred_from_real_shapes(family, unet, vae, text, tmp_path):
    """A full-size SD 1.5 / 2.0-base (its LDM config beside it: epsilon) / 2.1 / SDXL single file
    (shapes from published configs, diffusers' models on torch's meta device, no memory): the
    configs read off it are the published architectures."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    data = os.path.join(os.path.dirname(__file__), "data", "configs")
    load = lambda name: json.load(open(os.path.join(data, name)))
    shapes = lambda model: {k: np.broadcast_to(np.float16(0), tuple(v.shape)) for k, v in model.state_dict().items()}
    open_clip = family.startswith("sd2")
    text_2 = "sdxl_text_encoder_2.json" if family == "sdxl" else None
    with torch.device("meta"):
        state = to_ldm(shapes(UNet2DConditionModel.from_config(load(unet))), load(unet),
                       shapes(AutoencoderKL.from_config(load(vae))), load(vae),
                       shapes(CLIPTextModel(CLIPTextConfig.from_dict(load(text)))), open_clip=open_clip,
                       extra_layer_rng=np.random.default_rng(0) if open_clip else None,
                       text_2=shapes(CLIPTextModelWithProjection(CLIPTextConfig.from_dict(load(text_2))))
                       if text_2 else None)
    if family == "sd2base":
        (tmp_path / "model.yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    inferred = single_file_configs.infer_configs(str(tmp_path / "model.safetensors"), state)
    assert configs.differences("unet", load(unet), inferred["unet"]) == []
    assert configs.differences("text_encoder", load(text), inferred["text_encoder"]) == []
    if text_2:
        assert configs.differences("text_encoder", load(text_2), inferred["text_encoder_2"]) == []
    assert inferred["unet"]["sample_size"] == load(unet)["sample_size"]
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels",
                "sample_size", "down_block_types", "up_block_types", "scaling_factor"):
        assert inferred["vae"][key] == load(vae).get(key, 0.18215), key
    assert inferred["scheduler"]["prediction_type"] == ("v_prediction" if family == "sd2" else "epsilon")


def test_kohya_sdxl_lora_in_original_unet_naming_matches_diffusers(folders, loaded, tmp_path):
    """kohya's SDXL LoRA names UNet modules as the original (SGM) UNet does (`lora_unet_input_blocks_4_1_
    transformer_blocks_0_attn1_to_q`, `lora_unet_middle_block_1_...`, `lora_unet_output_blocks_...`), text
    encoders as lora_te1_/lora_te2_: LoRA (and 3x3 LoCon) on every linear and conv layer of the UNet
    (conv_in/out and the time and label embeddings too) and both encoders, per-module alphas; our merge against diffusers' load_lora_weights of the file
    (its non-diffusers converter), UNet output and both encoders' prompt embeddings."""
    import jax
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors.numpy import save_file

    from finextract_jax.models import sdxl

    tp = StableDiffusionXLPipeline.from_pretrained(folders["sdxl"])
    config = tp.unet.config
    attention_blocks = {i for i, t in enumerate(config.up_block_types) if t.startswith("CrossAttn")}
    rng = np.random.default_rng(7)
    tensors = {}
    for prefix, model in (("lora_unet_", tp.unet), ("lora_te1_", tp.text_encoder), ("lora_te2_", tp.text_encoder_2)):
        for name, layer in model.named_modules():
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) or name == "text_projection":
                continue
            if prefix == "lora_unet_":
                name = ldm_unet_key(name + ".weight", config.layers_per_block, attention_blocks)[: -len(".weight")]
            key, w = prefix + name.replace(".", "_"), layer.weight
            spatial, rank = tuple(w.shape[2:]), 2
            tensors[key + ".lora_down.weight"] = rng.standard_normal((rank, w.shape[1], *spatial), np.float32) * .2
            tensors[key + ".lora_up.weight"] = rng.standard_normal(
                (w.shape[0], rank, *((1, 1) if spatial else ())), np.float32) * .2
            # diffusers keeps the per-module alphas of UNet block modules outside the attention processors
            # only (others get the file's most common alpha): those vary, the rest carry that alpha.
            uniform = prefix != "lora_unet_" or "attn" in name or name.split(".")[0] in ("time_embed", "label_emb", "out")
            tensors[key + ".alpha"] = np.array(4.0 if uniform else rng.choice([1.0, 8.0]), np.float32)
    sgm = [k for k in tensors if k.startswith(("lora_unet_input_blocks", "lora_unet_middle_block",
                                               "lora_unet_output_blocks"))]
    assert any("transformer_blocks_1" in k for k in sgm) and any(k.endswith("_op.lora_down.weight") for k in sgm)
    file = str(tmp_path / "kohya_sdxl.safetensors")
    save_file(tensors, file)
    tp.load_lora_weights(file)
    prompts = ["a photo of sks dog", "a painting"]
    rng = np.random.default_rng(1)
    x, t = rng.standard_normal((2, 4, 8, 8), dtype=np.float32), np.array([10, 700])
    time_ids = np.array([[16, 16, 0, 0, 16, 16]] * 2, np.float32)
    with torch.no_grad():
        ref_context, _, ref_pooled, _ = tp.encode_prompt(prompts, do_classifier_free_guidance=False)
        ref_eps = tp.unet(torch.tensor(x), torch.tensor(t), ref_context, added_cond_kwargs={
            "text_embeds": ref_pooled, "time_ids": torch.tensor(time_ids)}).sample.numpy()
    base = loaded["sdxl"]
    ours = load_finetuned(base, file, cache_dir=None)
    module = base.unet.module
    run = jax.jit(lambda p, c, pooled: module.apply({"params": p}, x, t, c, added_cond_kwargs={
        "text_embeds": pooled, "time_ids": time_ids}))
    ref_context, ref_pooled = ref_context.numpy(), ref_pooled.numpy()
    assert np.abs(np.asarray(run(base.unet.params, ref_context, ref_pooled)) - ref_eps).max() > 1e-2
    assert np.abs(np.asarray(run(ours.unet.params, ref_context, ref_pooled)) - ref_eps).max() <= 1e-4
    context, pooled = sdxl.encode_prompts(ours, prompts)
    base_context, _ = sdxl.encode_prompts(base, prompts)
    assert np.abs(np.asarray(base_context) - ref_context).max() > 1e-2
    assert np.abs(np.asarray(context) - ref_context).max() <= 1e-4
    assert np.abs(np.asarray(pooled) - ref_pooled).max() <= 1e-4


def test_sdxl_single_files_extract(files, tmp_path):
    """The extract entry point with an SDXL single file as --pretrained (configs off its shapes,
    tokenizers beside it) and as --finetuned: a complete SDXL run."""
    from finextract_jax.sampling.run import ExtractConfig, extract

    record = extract(ExtractConfig(pretrained=files["sdxl"], finetuned=files["sdxl"], prompt="a photo of sks dog",
                                   guidance_scale=3.0, num_images=2, batch_size=2, steps=2),
                     str(tmp_path / "run"), progress=False)
    assert record["status"] == "complete" and record["sdxl"]["unconditional"] == "zeros"
    assert sorted(os.listdir(tmp_path / "run" / "images")) == ["00000.png", "00001.png"]
