"""Start noise depends only on (seed, image index); --init_latents loading and validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finextract_jax.errors import InputError
from finextract_jax.sampling.noise import batch_start_noise, load_init_latents, start_noise

CHW = (4, 8, 8)


# Each distinct batch size compiles the threefry program (~1 s on CPU): reuse sizes 8 and 2.
@pytest.fixture(scope="module")
def full():
    return np.asarray(start_noise(0, np.arange(8), CHW))


def test_any_image_regenerates_alone(full):
    assert full.shape == (8,) + CHW and full.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(start_noise(0, np.array([3, 4]), CHW)), full[3:5])
    # Independent of how indices are batched or ordered.
    np.testing.assert_array_equal(np.asarray(start_noise(0, [5, 1], CHW)), full[[5, 1]])


def test_seed_and_index_matter(full):
    other = np.asarray(start_noise(1, np.arange(8), CHW))
    assert not np.allclose(full, other)
    assert not np.allclose(full[0], full[1])
    assert abs(full.mean()) < 0.1 and abs(full.std() - 1) < 0.1


def test_jit_with_traced_seed_and_indices(full):
    f = jax.jit(start_noise, static_argnums=2)
    np.testing.assert_array_equal(np.asarray(f(0, jnp.arange(6, 8), CHW)), full[6:8])
    np.testing.assert_array_equal(np.asarray(f(1, jnp.arange(2), CHW)),
                                  np.asarray(start_noise(1, [0, 1], CHW)))


def test_bad_noise_args():
    with pytest.raises(InputError):
        start_noise(0, np.zeros((2, 2), np.int32), CHW)
    with pytest.raises(InputError):
        start_noise(0, np.array([0.5]), CHW)
    with pytest.raises(InputError):
        start_noise(0, [0], (4, 8))
    with pytest.raises(InputError, match="seed"):
        start_noise(-1, [0], CHW)


def _save(tmp_path, arr, name="z.npy"):
    p = tmp_path / name
    np.save(p, arr)
    return str(p)


def test_load_init_latents_ok(tmp_path):
    arr = np.random.default_rng(0).standard_normal((3,) + CHW)  # float64 on disk
    got = load_init_latents(_save(tmp_path, arr), num_images=3, shape_chw=CHW)
    assert got.dtype == np.float32 and got.shape == (3,) + CHW
    np.testing.assert_allclose(got, arr, rtol=1e-6)
    assert load_init_latents(_save(tmp_path, arr)).shape == (3,) + CHW
    rows = batch_start_noise([2, 0], 0, CHW, init_latents=got)
    np.testing.assert_array_equal(np.asarray(rows), got[[2, 0]])
    np.testing.assert_array_equal(np.asarray(batch_start_noise([1, 2], 0, CHW)),
                                  np.asarray(start_noise(0, [1, 2], CHW)))
    with pytest.raises(InputError, match="out of range"):
        batch_start_noise([3], 0, CHW, init_latents=got)


@pytest.mark.parametrize("arr,kwargs,match", [
    (np.zeros((3, 4, 8)), {}, r"shape \[3, 4, 8\]; expected \[num_images, C, H, W\]"),
    (np.zeros((2,) + CHW), {"num_images": 3}, r"2 images .* --num_images=3; expected \[3, C, H, W\]"),
    (np.zeros((3, 4, 16, 16)), {"num_images": 3, "shape_chw": CHW},
     r"per-image shape \[4, 16, 16\].*\[4, 8, 8\]"),
    (np.zeros((3,) + CHW, np.int32), {}, "dtype int32"),
    (np.full((3,) + CHW, np.nan), {}, r"non-finite values in images \[0, 1, 2\]"),
])
def test_load_init_latents_rejects(tmp_path, arr, kwargs, match):
    with pytest.raises(InputError, match=match):
        load_init_latents(_save(tmp_path, arr), **kwargs)


def test_load_init_latents_bad_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_init_latents(str(tmp_path / "missing.npy"))
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not an array")
    with pytest.raises(InputError, match="cannot read"):
        load_init_latents(str(junk))
    npz = tmp_path / "z.npz"
    np.savez(npz, a=np.zeros((1,) + CHW))
    with pytest.raises(InputError, match=".npz"):
        load_init_latents(str(npz))
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="cannot read"):
        load_init_latents(str(obj))
