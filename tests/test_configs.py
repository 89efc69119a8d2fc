"""Configs compared as models: real published config.json files (tests/data/configs/README.md)
resolve like diffusers/transformers resolve them, old/new pairs of one model are compatible, a
different architecture is refused naming the field, and an old config builds the same network."""
import inspect
import json
import os
import shutil

import pytest

from finextract_jax.errors import ConfigMismatchError
from finextract_jax.models import components, configs
from finextract_jax.models.pipeline import check_compatible, load_finetuned, load_pipeline

DATA = os.path.join(os.path.dirname(__file__), "data", "configs")


def _config(name):
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)


UNETS = ["sd14_unet.json", "sd15_unet.json", "sd15_unet_resaved_diffusers_0.33.1.json",
         "dreambooth_sd15_unet_diffusers_0.39.0.json", "sd20base_unet.json", "sd21_unet.json"]
SD1_UNETS = UNETS[:4]
SD1_SCHEDULERS = ["sd14_scheduler.json", "sd15_scheduler_resaved_diffusers_0.21.4.json",
                  "dreambooth_sd15_scheduler_diffusers_0.39.0.json"]
SD1_TEXT_ENCODERS = ["sd14_text_encoder.json", "sd15_text_encoder_resaved_transformers_4.37.2.json",
                     "dreambooth_sd15_text_encoder_transformers_4.57.6.json"]


def _tiny(config: dict) -> dict:
    """The same keys, channels scaled down 8x (norm groups 8 so that every block still divides)."""
    tiny = dict(config)
    tiny["block_out_channels"] = [c // 8 for c in config["block_out_channels"]]
    tiny["cross_attention_dim"] = config["cross_attention_dim"] // 8
    tiny["norm_num_groups"] = 8
    tiny["sample_size"] = 8
    return tiny


def _as_lists(value):
    return list(value) if isinstance(value, tuple) else value


def test_unet_defaults_are_diffusers_signature():
    from diffusers import UNet2DConditionModel

    params = inspect.signature(UNet2DConditionModel.__init__).parameters
    assert configs.UNET_DEFAULTS == {k: _as_lists(p.default) for k, p in params.items() if k != "self"}
    # Every argument diffusers knows is built, refused unless at its default, or known not to matter.
    handled = set(components._UNET_FIELDS) | set(components._UNET_DEFAULT_ONLY) | components._UNET_IGNORED
    assert handled == set(configs.UNET_DEFAULTS)
    assert all(configs.UNET_DEFAULTS[k] == v for k, v in components._UNET_DEFAULT_ONLY.items())


@pytest.mark.parametrize("name", ["PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "LMSDiscreteScheduler",
                                  "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                  "DPMSolverMultistepScheduler"])
def test_scheduler_defaults_are_diffusers_signature(name):
    import diffusers

    params = inspect.signature(getattr(diffusers, name).__init__).parameters
    for key, value in configs.SCHEDULER_DEFAULTS.items():
        if key in params:
            assert params[key].default == value, (name, key)


@pytest.mark.parametrize("name", UNETS)
def test_resolved_unet_config_is_what_diffusers_records(name):
    """diffusers' own resolution (the config a model built from the file records) is ours."""
    import torch
    from diffusers import UNet2DConditionModel

    raw = _config(name)
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(raw)
    theirs = {k: _as_lists(v) for k, v in model.config.items() if not k.startswith("_")}
    ours = {k: v for k, v in configs.resolve_unet(raw).items() if not k.startswith("_")}
    assert ours == theirs


@pytest.mark.parametrize("old,new", [(SD1_UNETS[0], SD1_UNETS[3]), (SD1_UNETS[1], SD1_UNETS[2]),
                                     (SD1_UNETS[1], SD1_UNETS[3]), (SD1_UNETS[0], SD1_UNETS[1])])
def test_old_and_new_unet_configs_are_compatible(old, new):
    check_compatible(_config(old), _config(new), "ft")
    check_compatible(_config(new), _config(old), "ft")


@pytest.mark.parametrize("name", ["sd20base_unet.json", "sd21_unet.json"])
def test_sd2_unet_and_its_current_save_are_compatible(name, tmp_path):
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        UNet2DConditionModel.from_config(_config(name)).save_config(str(tmp_path))
    resaved = json.loads((tmp_path / "config.json").read_text())
    assert "transformer_layers_per_block" in resaved and "transformer_layers_per_block" not in _config(name)
    check_compatible(_config(name), resaved, "ft")
    check_compatible(resaved, _config(name), "ft")


def test_sd20_base_and_sd21_768_share_unet_and_text_encoder_not_prediction_type():
    """2.0-base (512 px, epsilon) and 2.1 (768 px, v-prediction, upcast attention): one UNet and text
    encoder architecture (sample size and fp16 upcasting are not architecture), different targets."""
    check_compatible(_config("sd20base_unet.json"), _config("sd21_unet.json"), "ft")
    check_compatible(_config("sd20base_text_encoder.json"), _config("sd21_text_encoder.json"), "ft", "text_encoder")
    assert "prediction_type" not in _config("sd20base_scheduler.json")
    with pytest.raises(ConfigMismatchError, match="prediction_type: pretrained 'epsilon' vs fine-tuned 'v_prediction'"):
        check_compatible(_config("sd20base_scheduler.json"), _config("sd21_scheduler.json"), "ft", "scheduler")
    with pytest.raises(ConfigMismatchError, match="cross_attention_dim: pretrained 768 vs fine-tuned 1024"):
        check_compatible(_config("sd14_unet.json"), _config("sd20base_unet.json"), "ft")


def test_different_unet_architecture_is_refused_naming_fields():
    with pytest.raises(ConfigMismatchError) as err:
        check_compatible(_config("sd15_unet.json"), _config("sd21_unet.json"), "ft")
    message = str(err.value)
    for field in ("cross_attention_dim: pretrained 768 vs fine-tuned 1024", "use_linear_projection",
                  "attention_heads: pretrained [8, 8, 8, 8] vs fine-tuned [5, 10, 20, 20]"):
        assert field in message
    assert "sample_size" not in message and "upcast_attention" not in message  # not architecture
    # One field changed in a full current config is named alone.
    changed = dict(_config("dreambooth_sd15_unet_diffusers_0.39.0.json"), transformer_layers_per_block=2)
    with pytest.raises(ConfigMismatchError, match=r"in transformer_layers_per_block: pretrained \[1, 1, 1, 1\] vs "
                                                  r"fine-tuned \[2, 2, 2, 2\]$"):
        check_compatible(_config("sd14_unet.json"), changed, "ft")


def test_scheduler_and_text_encoder_pairs():
    for new in SD1_SCHEDULERS[1:]:
        check_compatible(_config(SD1_SCHEDULERS[0]), _config(new), "ft", "scheduler")
    for new in SD1_TEXT_ENCODERS[1:]:  # SD 1.4's file has no projection_dim: transformers' default, 512
        check_compatible(_config(SD1_TEXT_ENCODERS[0]), _config(new), "ft", "text_encoder")
    with pytest.raises(ConfigMismatchError, match="prediction_type: pretrained 'epsilon' vs fine-tuned 'v_prediction'"):
        check_compatible(_config("sd14_scheduler.json"), _config("sd21_scheduler.json"), "ft", "scheduler")
    with pytest.raises(ConfigMismatchError, match="hidden_act: pretrained 'quick_gelu' vs fine-tuned 'gelu'.*"
                                                  "hidden_size: pretrained 768 vs fine-tuned 1024"):
        check_compatible(_config("sd14_text_encoder.json"), _config("sd21_text_encoder.json"), "ft", "text_encoder")


def test_text_encoder_resolution_is_transformers():
    from transformers import CLIPTextConfig

    for name in SD1_TEXT_ENCODERS + ["sd20base_text_encoder.json", "sd21_text_encoder.json"]:
        resolved = CLIPTextConfig.from_dict(_config(name)).to_dict()
        arch = configs.text_encoder_architecture(_config(name))
        assert all(arch[k] == resolved[k] for k in arch if k != "architectures")


@pytest.mark.parametrize("name", ["sd14_unet.json", "sd20base_unet.json", "sd21_unet.json"])
def test_old_config_builds_the_network_of_its_full_form(name):
    """A tiny variant of the published file (its keys, channels / 8) and of diffusers' full save of
    it build the same module with the same parameter tree as diffusers PyTorch's model."""
    from diffusers import UNet2DConditionModel

    from finextract_jax.models.convert import flax_to_pytorch_key

    old = _tiny(_config(name))
    model = UNet2DConditionModel.from_config(old)
    full = {k: _as_lists(v) for k, v in model.config.items()}
    assert set(full) - set(old)  # the old file really leaves keys out
    ours_old, ours_full = components.unet_from_config(old), components.unet_from_config(full)
    assert ours_old == ours_full
    shapes = components.expected_shapes("unet", ours_old, old)
    assert shapes == components.expected_shapes("unet", ours_full, full)
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = {}
    for key, value in shapes.items():
        shape = tuple(value.shape)
        if key[-1] == "kernel":
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        ours[flax_to_pytorch_key(key)] = shape
    assert ours == theirs


def test_old_pretrained_and_current_finetune_load_as_a_pair(tiny_dir, tmp_path):
    """The issue's pair: a pretrained folder whose unet/config.json has only the keys diffusers 0.2.2
    wrote, and a DreamBooth fine-tune saved by current diffusers (every key)."""
    import torch
    from diffusers import UNet2DConditionModel

    pretrained = shutil.copytree(tiny_dir["sd1"], tmp_path / "pretrained")
    config_file = pretrained / "unet" / "config.json"
    full = json.loads(config_file.read_text())
    old_keys = set(_config("sd14_unet.json")) | {"_class_name"}
    config_file.write_text(json.dumps({k: v for k, v in full.items() if k in old_keys}))
    finetuned = tmp_path / "finetuned"
    shutil.copytree(tiny_dir["sd1"] + "/unet", finetuned / "unet")
    with torch.device("meta"):
        UNet2DConditionModel.from_config(full).save_config(str(finetuned / "unet"))
    assert "only_cross_attention" in json.loads((finetuned / "unet" / "config.json").read_text())
    base = load_pipeline(str(pretrained), cache_dir=None)
    tuned = load_finetuned(base, str(finetuned), cache_dir=None)
    assert tuned.unet.module == base.unet.module
