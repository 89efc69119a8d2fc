"""Every file and folder a tool writes goes through here.

Two rules (docs/cli.md, "Bad input"):
- Atomic: a reader (or a resumed run) never sees half a file or half a folder: files and
  folders are built under a temporary name beside their destination and renamed into place.
  They get the mode a plain open()/mkdir() would give under the umask (mkstemp's and mkdtemp's
  0600/0700 would make outputs private to the writer, which breaks shared workdirs).
- Ownership: a tool writes only into folders it created or that carry a finextract record
  (`OWNED_MARKERS`), refuses anything else by name, and never writes an output inside one of
  its inputs. Checks that only read (`check_output_dir`, `check_not_inside`,
  `check_writable_parent`) run before the first byte is written; `claim_dir` then creates or
  adopts the folder and leaves the marker.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile

from finextract_jax.errors import InputError

MARKER = ".finextract"  # left in every folder a tool creates or adopts (hidden: image listings skip it)
# Any of these shows that a finextract tool wrote the folder (records of older versions included).
OWNED_MARKERS = (MARKER, "run.json", "clusters.json", "metrics.json", "caption.json")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def _fsync_dir(folder: str):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a temporary path beside `path`; write it (any library's save(path)); on leaving the
    block it gets the umask's mode, is fsynced and renamed over `path`. On an exception it is
    removed and `path` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, file_mode())
        os.close(fd)
        fd = None
        yield tmp
        os.chmod(tmp, file_mode())  # again: a writer may have replaced the file (safetensors makes it 0600)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes):
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_json(path: str, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_png(path: str, image):
    """`image`: uint8 [H, W, 3] (or [H, W]) array, or a PIL image."""
    from PIL import Image

    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def is_owned(folder: str) -> bool:
    """True when `folder` carries a finextract record (see OWNED_MARKERS)."""
    return any(os.path.lexists(os.path.join(folder, name)) for name in OWNED_MARKERS)


def _is_empty_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def check_writable_parent(path: str, flag: str):
    """Refuse, before anything is written, an output `path` that cannot be created: its nearest
    existing ancestor must be a folder this process may write into."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"{flag} {path}: {parent} is a file, not a folder; choose another path")
    if os.path.exists(path) and os.path.isdir(path):
        parent = path
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: {parent} is not writable; choose another path")


def check_output_dir(path: str, flag: str):
    """Refuse an output folder that exists but was not made by finextract (no record in it), or a
    file where a folder is expected; then check that it can be written. Writes nothing."""
    if not path:
        raise InputError(f"{flag} is required")
    if os.path.lexists(path):
        if not os.path.isdir(path) or os.path.islink(path):
            raise InputError(f"{flag} {path} exists and is not a folder; choose a new folder")
        if os.listdir(path) and not is_owned(path):
            raise InputError(f"{flag} {path} exists and was not written by finextract (no {MARKER} or "
                             "run record in it); choose a new or empty folder")
    check_writable_parent(path, flag)


def claim_dir(path: str, flag: str) -> str:
    """Create `path` (or adopt it: empty, or already ours) and leave the marker in it."""
    check_output_dir(path, flag)
    if not os.path.exists(os.path.join(path, MARKER)):
        adopted = os.path.isdir(path)
        os.makedirs(path, exist_ok=True)
        mark_own(path, created=not adopted)
    return path


def mark_own(folder: str, created: bool = True):
    """Leave the marker in a folder a tool made (or adopted empty)."""
    how = "created" if created else "adopted"
    atomic_write_bytes(os.path.join(folder, MARKER),
                       f"{how} by finextract_jax; its tools write only into folders holding this file\n".encode())


def created_by_us(folder: str) -> bool:
    """Whether `claim_dir` created `folder` (rather than adopting an empty one the user made)."""
    try:
        with open(os.path.join(folder, MARKER), "rb") as f:
            return f.read().startswith(b"created")
    except OSError:
        return False


@contextlib.contextmanager
def claimed(path: str, flag: str):
    """`claim_dir` for a block of work: when the block fails and it left nothing but the marker in a
    folder it created, the folder is removed again (no empty leftovers of a refused run)."""
    created = []  # the folders claim_dir makes, deepest first
    folder = os.path.abspath(path)
    while not os.path.lexists(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    claim_dir(path, flag)
    try:
        yield path
    except BaseException:
        if created and os.listdir(created[0]) == [MARKER]:
            os.remove(os.path.join(created[0], MARKER))
            for folder in created:
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
        raise


def _contains(outer: str, inner: str) -> bool:
    outer, inner = os.path.realpath(outer), os.path.realpath(inner)
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def check_not_inside(out: str, out_flag: str, inputs: dict, both_ways: bool = False):
    """Refuse an output equal to or inside an input folder ({flag: path}); with `both_ways`, also an
    input inside the output (an output replaced as a whole would take the input with it)."""
    for flag, path in inputs.items():
        if not path:
            continue
        if _contains(path, out) or (both_ways and _contains(out, path)):
            raise InputError(f"{out_flag} {out} and {flag} {path} overlap; write outputs outside the inputs")


@contextlib.contextmanager
def atomic_dir(path: str, flag: str, verified: bool = False, marker: bool = True):
    """Yield an empty staging folder beside `path` (umask's mode); on leaving the block it gets the
    marker (unless the caller keeps its own record of what it wrote) and replaces `path`. An
    existing `path` must be ours (check_output_dir, unless the caller `verified` that it holds only
    files it wrote); it is removed only after the new one is in place."""
    if not verified:
        check_output_dir(path, flag)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.", suffix=".tmp", dir=parent)
    trash = None
    try:
        os.chmod(staging, dir_mode())
        yield staging
        if marker:
            mark_own(staging)
        if os.path.lexists(path):
            trash = tempfile.mkdtemp(prefix=".old.", dir=parent)
            os.replace(path, os.path.join(trash, "old"))
        os.replace(staging, path)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if trash and not os.path.lexists(path) and os.path.lexists(os.path.join(trash, "old")):
            os.replace(os.path.join(trash, "old"), path)
        raise
    finally:
        if trash:
            shutil.rmtree(trash, ignore_errors=True)


def read_record(path: str, remedy: str) -> dict:
    """A JSON record a run wrote (run.json, a stage's done marker); unreadable -> InputError + remedy."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: unreadable ({err}); {remedy}") from None


def changed_settings(old: dict, new: dict, prefix: str = "", limit: int | None = None) -> str:
    """'k: old -> new; ...' for every key whose value differs ('' when none): what a refusal names."""
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))[:limit]
    return "; ".join(f"{prefix}{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
