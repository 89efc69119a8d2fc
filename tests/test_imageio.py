"""Image intake rules (finextract_jax/imageio.py): what every tool sees of an odd image file."""
import logging

import numpy as np
import pytest
from PIL import Image

from finextract_jax import imageio
from finextract_jax.errors import InputError


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = imageio.to_uint8_array(imageio.load_rgb(str(path)))
    expected = np.round(ramp / 65535.0 * 255.0).astype(np.uint8)
    assert rgb.shape == (16, 16, 3) and np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    assert 120 < rgb.mean() < 135  # a mid-grey ramp, not the almost-white image clipping gave


def test_transparency_is_composited_on_white(tmp_path, caplog):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200  # red, fully transparent on the left half, opaque on the right
    rgba[:, 8:, 3] = 255
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    with caplog.at_level(logging.INFO, logger="finextract_jax.imageio"):
        rgb = imageio.to_uint8_array(imageio.load_rgb(str(path)))
    assert (rgb[:, :8] == 255).all() and (rgb[:, 8:] == [200, 0, 0]).all()
    assert "composited on white" in caplog.text


def test_palette_with_transparent_entry_and_plain_palette(tmp_path):
    pal = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L").convert("P")
    pal.save(tmp_path / "p.png")
    assert imageio.load_rgb(str(tmp_path / "p.png")).mode == "RGB"
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pt.png", transparency=0)
    rgb = imageio.to_uint8_array(imageio.load_rgb(str(tmp_path / "pt.png")))
    assert (rgb[0, 0] == 255).all()  # the transparent entry became white


def test_too_small_is_refused_and_extreme_aspect_warned(tmp_path, caplog):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(InputError, match="smaller than 8"):
        imageio.load_rgb(str(tmp_path / "dot.png"))
    Image.new("RGB", (2, 5000)).save(tmp_path / "sliver.png")
    with pytest.raises(InputError, match="2x5000"):
        imageio.load_rgb(str(tmp_path / "sliver.png"))
    Image.new("RGB", (8, 100)).save(tmp_path / "tall.png")
    with caplog.at_level(logging.WARNING, logger="finextract_jax.imageio"):
        assert imageio.load_rgb(str(tmp_path / "tall.png")).size == (8, 100)
    assert "aspect ratio" in caplog.text


def test_truncated_file_is_refused_by_name(tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot read image .*a.png"):
        imageio.load_rgb(str(tmp_path / "a.png"))


def test_training_images_go_through_the_same_rules(tmp_path):
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    pixels = imageio.load_square(str(tmp_path / "grey16.png"), 16)
    assert np.array_equal(pixels, imageio.to_uint8_array(imageio.load_rgb(str(tmp_path / "grey16.png"))))
