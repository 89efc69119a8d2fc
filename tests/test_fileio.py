"""Atomic writes leave the file a plain open() would (mode from the umask), and no temp file."""
import os

from finextract_jax.fileio import atomic_write_bytes


def test_atomic_write_gives_umask_mode_and_leaves_no_temp(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "a.json"
        atomic_write_bytes(str(path), b"{}")
        assert path.read_bytes() == b"{}" and (path.stat().st_mode & 0o777) == 0o644
        assert os.listdir(tmp_path) == ["a.json"]
    finally:
        os.umask(old)


def test_atomic_dir_and_file_get_umask_modes(tmp_path):
    from finextract_jax.fileio import atomic_dir, atomic_file

    old = os.umask(0o027)
    try:
        with atomic_dir(str(tmp_path / "out"), "--out") as staging:
            with atomic_file(os.path.join(staging, "w.bin")) as tmp:
                with open(tmp, "wb") as f:
                    f.write(b"x")
        assert (os.stat(tmp_path / "out").st_mode & 0o777) == 0o750
        assert (os.stat(tmp_path / "out" / "w.bin").st_mode & 0o777) == 0o640
        assert sorted(os.listdir(tmp_path)) == ["out"]
    finally:
        os.umask(old)


def test_ownership_rules(tmp_path):
    import pytest

    from finextract_jax.errors import InputError
    from finextract_jax.fileio import MARKER, check_not_inside, check_output_dir, claim_dir, claimed

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not written by finextract"):
        check_output_dir(str(tmp_path / "mine"), "--workdir")
    (tmp_path / "empty").mkdir()
    claim_dir(str(tmp_path / "empty"), "--workdir")  # an empty folder is adopted
    assert os.listdir(tmp_path / "empty") == [MARKER]
    with pytest.raises(InputError, match="overlap"):
        check_not_inside(str(tmp_path / "mine" / "out"), "--out", {"--train_dir": str(tmp_path / "mine")})
    with pytest.raises(InputError, match="overlap"):
        check_not_inside(str(tmp_path), "--out", {"--train_dir": str(tmp_path / "mine")}, both_ways=True)
    with pytest.raises(RuntimeError):
        with claimed(str(tmp_path / "new" / "deeper"), "--workdir"):
            raise RuntimeError("the job failed before writing anything")
    assert not (tmp_path / "new").exists()  # nothing left of a failed run


def test_exports_get_umask_modes_and_replace_only_their_own(tmp_path):
    """The LoRA file was mkstemp's 0600 and the DreamBooth folder mkdtemp's 0700; an existing
    file or folder finextract did not write is refused, one it wrote is replaced."""
    import numpy as np
    import pytest

    from finextract_jax.errors import InputError
    from finextract_jax.finetune.export import save_lora

    factors = {"down_blocks_0": {"attentions_0": {"to_q": {"down": np.ones((4, 2), np.float32),
                                                           "up": np.ones((2, 4), np.float32)}}}}
    old = os.umask(0o022)
    try:
        path = save_lora(str(tmp_path / "a.safetensors"), factors, rank=2, alpha=2.0)
        assert (os.stat(path).st_mode & 0o777) == 0o644
        save_lora(path, factors, rank=2, alpha=2.0)  # its own file: replaced
        folder = tmp_path / "lora_dir"
        save_lora(str(folder), factors, rank=2, alpha=2.0)
        assert (os.stat(folder).st_mode & 0o777) == 0o755
        (tmp_path / "user.safetensors").write_bytes(b"the user's")
        with pytest.raises(InputError, match="not written by finextract"):
            save_lora(str(tmp_path / "user.safetensors"), factors, rank=2, alpha=2.0)
        assert (tmp_path / "user.safetensors").read_bytes() == b"the user's"
        assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    finally:
        os.umask(old)
