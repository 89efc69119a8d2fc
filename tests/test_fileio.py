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
