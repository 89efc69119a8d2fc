"""Atomic file writes: a reader (or a resumed run) never sees a half-written file."""
from __future__ import annotations

import io
import json
import os
import tempfile


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str, data: bytes):
    """Write to a temp file in the same folder, fsync, then rename over `path`.

    The file gets the mode a plain open() would give (mkstemp's are 0600: private to the writer,
    which breaks shared workdirs)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_png(path: str, image):
    """`image`: uint8 [H, W, 3] (or [H, W]) array."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def read_record(path: str, remedy: str) -> dict:
    """A JSON record a run wrote (run.json, a stage's done marker); unreadable -> InputError + remedy."""
    from finextract_jax.errors import InputError

    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: unreadable ({err}); {remedy}") from None


def changed_settings(old: dict, new: dict, prefix: str = "", limit: int | None = None) -> str:
    """'k: old -> new; ...' for every key whose value differs ('' when none): what a refusal names."""
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))[:limit]
    return "; ".join(f"{prefix}{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
