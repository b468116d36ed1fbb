"""Build the small, real sample image datasets shipped in ``sample_data/``.

Two datasets are produced, deterministically (fixed seed, sorted inputs):

``sample_data/fashion_mnist/``
    A class-balanced subset of Fashion-MNIST (Zalando Research, MIT licence),
    read from the Debian package ``dataset-fashion-mnist`` (the four
    ``*-idx?-ubyte.gz`` files in ``/usr/share/datasets/fashion-mnist``).
    ``train/<class>/`` holds 30 images per class drawn from the Fashion-MNIST
    training set and ``test/<class>/`` holds 20 per class drawn from the
    Fashion-MNIST test set (so the test split is genuinely held out).
    Images are written unchanged as 28x28 8-bit grayscale PNGs (mode ``L``)
    named ``<class>_<index>.png``, where ``<index>`` is the image's position in
    the original idx file.

``sample_data/emoji/``
    40 Noto emoji images (Google, Apache-2.0) per class for five classes
    (animal, food, vehicle, face, flag), taken from the npm package
    ``emoji-datasource-google@16.0.0`` (iamcal/emoji-data, MIT).  The 64x64
    RGBA PNGs are copied byte-for-byte (transparency is kept on purpose, it
    exercises alpha handling) and named ``<class>/<short_name>.png``.

``sample_data/emoji_multilabel/``
    A multi-label set: about 240 of the same Noto emoji images in ``images/``
    and a ``labels.csv`` of ``path,labels`` rows, the labels of each image
    (animal, face, food, hand, heart, person, smile, sport) joined by ``;``.
    Labels come from the emoji's ``subcategory`` in ``emoji.json`` and its
    English tags in the npm package ``emojibase-data@17.0.0`` (MIT); every
    image with two or more labels is kept, then single-label images are drawn
    until each label is on 40 images (or has 8 single-label images).

Licence files are written at each dataset's top level and a
``sample_data/README.md`` describes the data and its provenance.

Usage::

    python scripts/build_sample_data.py [--fashion-dir DIR] [--emoji-dir DIR]
                                        [--out DIR] [--seed N]

If ``--emoji-dir`` is not given, the script runs
``npm pack emoji-datasource-google@16.0.0`` in a temporary directory and
extracts the parts it needs.  The script is idempotent: the two dataset folders
are deleted and rebuilt on every run.

Requires Python 3.11+, numpy and Pillow.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "sample_data"
DEFAULT_SEED = 20240601

# --------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------
FASHION_DEB_PACKAGE = "dataset-fashion-mnist"
DEFAULT_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# Label order as defined by Fashion-MNIST (label 0 .. 9).
FASHION_CLASSES = [
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_PER_CLASS = {"train": 30, "test": 20}

# --------------------------------------------------------------------------
# Emoji
# --------------------------------------------------------------------------
EMOJI_NPM_PACKAGE = "emoji-datasource-google"
EMOJI_NPM_VERSION = "16.0.0"
EMOJI_IMG_SUBDIR = Path("img") / "google" / "64"
EMOJI_PER_CLASS = 40
# class name -> predicate on the emoji.json ``subcategory`` field
EMOJI_CLASSES = {
    "animal": lambda sub: sub in {"animal-mammal", "animal-bird"},
    "food": lambda sub: sub in {"food-fruit", "food-vegetable", "food-prepared"},
    "vehicle": lambda sub: sub in {"transport-ground", "transport-air", "transport-water"},
    "face": lambda sub: sub.startswith("face-"),
    "flag": lambda sub: sub == "country-flag",
}
EMOJI_CLASS_DOC = {
    "animal": "animal-mammal, animal-bird",
    "food": "food-fruit, food-vegetable, food-prepared",
    "vehicle": "transport-ground, transport-air, transport-water",
    "face": "every subcategory starting with face- (face-smiling, face-concerned, ...)",
    "flag": "country-flag",
}

# --------------------------------------------------------------------------
# Emoji, multi-label
# --------------------------------------------------------------------------
EMOJIBASE_NPM_PACKAGE = "emojibase-data"
EMOJIBASE_NPM_VERSION = "17.0.0"
ML_PER_LABEL = 40
ML_MIN_SINGLES = 8
# label -> predicate on (emoji.json subcategory, emojibase English tags)
ML_LABELS = {
    "animal": lambda sub, tags: sub.startswith("animal-") or sub in {"cat-face", "monkey-face"},
    "face": lambda sub, tags: sub.startswith("face-") or sub == "cat-face" or "face" in tags,
    "food": lambda sub, tags: sub.startswith("food-"),
    "hand": lambda sub, tags: sub.startswith("hand") or "hand" in tags,
    "heart": lambda sub, tags: sub == "heart" or "heart" in tags,
    "person": lambda sub, tags: sub.startswith("person") or sub == "family",
    "smile": lambda sub, tags: bool(tags & {"smile", "smiling", "grin", "grinning"}),
    "sport": lambda sub, tags: sub in {"sport", "person-sport"} or bool(tags & {"sport", "ball"}),
}
ML_LABEL_DOC = {
    "animal": "subcategory animal-*, cat-face, monkey-face",
    "face": "subcategory face-* or cat-face, or tag `face`",
    "food": "subcategory food-*",
    "hand": "subcategory hand-*/hands, or tag `hand`",
    "heart": "subcategory heart, or tag `heart`",
    "person": "subcategory person-* or family",
    "smile": "tag smile, smiling, grin or grinning",
    "sport": "subcategory sport or person-sport, or tag `sport` or `ball`",
}

MIT_TEXT = """\
Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""

SIZE_LIMIT_BYTES = 5 * 1024 * 1024


class BuildError(RuntimeError):
    """Raised when an input is missing or malformed."""


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _reset_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def _find_idx_file(fashion_dir: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        candidate = fashion_dir / name
        if candidate.is_file():
            return candidate
    raise BuildError(
        f"{stem}(.gz) not found in {fashion_dir}; install the Debian package "
        f"'{FASHION_DEB_PACKAGE}' or pass --fashion-dir"
    )


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4:
        raise BuildError(f"{path}: file too short for an IDX header")
    zero1, zero2, dtype_code, ndim = struct.unpack(">BBBB", data[:4])
    if zero1 != 0 or zero2 != 0 or dtype_code != 0x08:
        raise BuildError(f"{path}: not an unsigned-byte IDX file")
    header_len = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    expected = int(np.prod(dims, dtype=np.int64))
    payload = np.frombuffer(data, dtype=np.uint8, offset=header_len)
    if payload.size != expected:
        raise BuildError(f"{path}: expected {expected} values for shape {dims}, got {payload.size}")
    return payload.reshape(dims)


def _debian_package_version(package: str) -> str | None:
    try:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return None
    version = result.stdout.strip()
    return version if result.returncode == 0 and version else None


# --------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------
def build_fashion_mnist(fashion_dir: Path, out_dir: Path, seed: int) -> dict:
    """Write the Fashion-MNIST subset; return per-split/per-class counts and provenance."""
    target = out_dir / "fashion_mnist"
    _reset_dir(target)
    counts: dict[str, dict[str, int]] = {}
    sources: dict[str, str] = {}
    for split_no, split in enumerate(("train", "test")):
        images_stem, labels_stem = FASHION_FILES[split]
        images_path = _find_idx_file(fashion_dir, images_stem)
        labels_path = _find_idx_file(fashion_dir, labels_stem)
        sources[images_path.name] = _sha256(images_path)
        sources[labels_path.name] = _sha256(labels_path)
        images = _read_idx(images_path)
        labels = _read_idx(labels_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise BuildError(f"{images_path}: unexpected image shape {images.shape}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise BuildError(f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images")

        per_class = FASHION_PER_CLASS[split]
        counts[split] = {}
        for label, class_name in enumerate(FASHION_CLASSES):
            candidates = np.flatnonzero(labels == label)  # already sorted
            if candidates.size < per_class:
                raise BuildError(f"{split}: only {candidates.size} images of class {class_name}")
            rng = np.random.default_rng([seed, split_no, label])
            chosen = np.sort(rng.choice(candidates, size=per_class, replace=False))
            class_dir = target / split / class_name
            class_dir.mkdir(parents=True)
            for idx in chosen:
                img = Image.fromarray(np.ascontiguousarray(images[idx]))  # 2-D uint8 -> mode "L"
                if img.mode != "L" or img.size != (28, 28):
                    raise BuildError(f"unexpected image {img.mode} {img.size} at index {idx}")
                img.save(class_dir / f"{class_name}_{int(idx):05d}.png", optimize=True)
            counts[split][class_name] = int(chosen.size)
    return {"counts": counts, "sources": sources, "dir": target}


def write_fashion_license(target: Path, deb_version: str | None) -> None:
    version = deb_version or "unknown"
    text = f"""\
Fashion-MNIST sample (sample_data/fashion_mnist)
================================================

Images: Fashion-MNIST, Copyright (c) 2017 Zalando SE (Zalando Research),
https://github.com/zalandoresearch/fashion-mnist

Licence: MIT (called "Expat" in Debian). The full text is reproduced below and
is also available at
https://github.com/zalandoresearch/fashion-mnist/blob/master/LICENSE
and, on Debian systems, in /usr/share/doc/{FASHION_DEB_PACKAGE}/copyright.

Obtained from the Debian package {FASHION_DEB_PACKAGE} (version {version});
the images are a subset, written unchanged as 28x28 grayscale PNGs by
scripts/build_sample_data.py.

------------------------------------------------------------------------------

The MIT License (MIT)

Copyright (c) 2017 Zalando SE, https://tech.zalando.com

{MIT_TEXT}"""
    (target / "LICENSE").write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------
# Emoji
# --------------------------------------------------------------------------
def _safe_extract(tar: tarfile.TarFile, members: list[tarfile.TarInfo], dest: Path) -> None:
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, members=members, filter="data")
        return
    dest_resolved = dest.resolve()
    for member in members:
        if not (member.isfile() or member.isdir()):
            raise BuildError(f"refusing to extract non-regular member {member.name}")
        if not (dest / member.name).resolve().is_relative_to(dest_resolved):
            raise BuildError(f"refusing to extract {member.name} outside {dest}")
    tar.extractall(dest, members=members)


def fetch_emoji_package(workdir: Path) -> Path:
    """Download emoji-datasource-google with ``npm pack``; return the extracted package dir."""
    spec = f"{EMOJI_NPM_PACKAGE}@{EMOJI_NPM_VERSION}"
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError(f"--emoji-dir not given and npm is not available to fetch {spec}")
    print(f"fetching {spec} with npm pack ...", flush=True)
    result = subprocess.run(
        [npm, "pack", spec, "--silent"],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise BuildError(f"npm pack {spec} failed:\n{result.stderr.strip()}")
    tarballs = sorted(workdir.glob("*.tgz"))
    if len(tarballs) != 1:
        raise BuildError(f"npm pack produced {len(tarballs)} tarballs in {workdir}")
    img_prefix = f"package/{EMOJI_IMG_SUBDIR.as_posix()}/"
    wanted = {"package/emoji.json", "package/LICENSE", "package/package.json"}
    with tarfile.open(tarballs[0], "r:gz") as tar:
        members = [
            m for m in tar.getmembers()
            if m.isfile() and (m.name in wanted or m.name.startswith(img_prefix))
        ]
        _safe_extract(tar, members, workdir)
    package_dir = workdir / "package"
    if not (package_dir / "emoji.json").is_file():
        raise BuildError(f"{tarballs[0].name} does not contain package/emoji.json")
    return package_dir


def build_emoji(emoji_dir: Path, out_dir: Path, seed: int) -> dict:
    """Write the emoji subset; return per-class counts and provenance."""
    emoji_json = emoji_dir / "emoji.json"
    img_dir = emoji_dir / EMOJI_IMG_SUBDIR
    if not emoji_json.is_file() or not img_dir.is_dir():
        raise BuildError(f"{emoji_dir} does not look like {EMOJI_NPM_PACKAGE} (need emoji.json and {EMOJI_IMG_SUBDIR}/)")
    package_version = None
    package_json = emoji_dir / "package.json"
    if package_json.is_file():
        meta = json.loads(package_json.read_text(encoding="utf-8"))
        package_version = meta.get("version")
        if meta.get("name") != EMOJI_NPM_PACKAGE or package_version != EMOJI_NPM_VERSION:
            print(
                f"warning: {emoji_dir} is {meta.get('name')}@{package_version}, "
                f"expected {EMOJI_NPM_PACKAGE}@{EMOJI_NPM_VERSION}",
                file=sys.stderr,
            )

    # Top-level entries of emoji.json are the base emoji; skin-tone variants
    # live in each entry's nested "skin_variations" and are ignored.
    entries = json.loads(emoji_json.read_text(encoding="utf-8"))

    target = out_dir / "emoji"
    _reset_dir(target)
    counts: dict[str, int] = {}
    for class_no, (class_name, matches) in enumerate(EMOJI_CLASSES.items()):
        candidates = sorted(
            (
                e for e in entries
                if e.get("has_img_google") and matches(e.get("subcategory") or "")
                and (img_dir / e["image"]).is_file()
            ),
            key=lambda e: e["short_name"],
        )
        if len(candidates) < EMOJI_PER_CLASS:
            raise BuildError(f"emoji class {class_name}: only {len(candidates)} candidates")
        rng = random.Random(f"{seed}-emoji-{class_no}-{class_name}")
        chosen = sorted(rng.sample(candidates, EMOJI_PER_CLASS), key=lambda e: e["short_name"])
        class_dir = target / class_name
        class_dir.mkdir(parents=True)
        for entry in chosen:
            src = img_dir / entry["image"]
            with Image.open(src) as img:
                if img.size != (64, 64):
                    raise BuildError(f"{src}: expected 64x64, got {img.size}")
            dst = class_dir / f"{entry['short_name']}.png"
            if dst.exists():
                raise BuildError(f"duplicate short_name {entry['short_name']} in class {class_name}")
            shutil.copyfile(src, dst)
        counts[class_name] = len(chosen)

    license_src = emoji_dir / "LICENSE"
    license_text = license_src.read_text(encoding="utf-8") if license_src.is_file() else None
    return {"counts": counts, "dir": target, "license_text": license_text, "version": package_version}


def fetch_emojibase_package(workdir: Path) -> Path:
    """Download emojibase-data with ``npm pack``; return the extracted package dir (en/data.json, LICENSE)."""
    spec = f"{EMOJIBASE_NPM_PACKAGE}@{EMOJIBASE_NPM_VERSION}"
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError(f"--emojibase-dir not given and npm is not available to fetch {spec}")
    print(f"fetching {spec} with npm pack ...", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([npm, "pack", spec, "--silent"], cwd=workdir, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"npm pack {spec} failed:\n{result.stderr.strip()}")
    tarballs = sorted(workdir.glob("emojibase-data-*.tgz"))
    if len(tarballs) != 1:
        raise BuildError(f"npm pack produced {len(tarballs)} emojibase-data tarballs in {workdir}")
    wanted = {"package/en/data.json", "package/LICENSE", "package/package.json"}
    with tarfile.open(tarballs[0], "r:gz") as tar:
        _safe_extract(tar, [m for m in tar.getmembers() if m.isfile() and m.name in wanted], workdir)
    if not (workdir / "package" / "en" / "data.json").is_file():
        raise BuildError(f"{tarballs[0].name} does not contain package/en/data.json")
    return workdir / "package"


def build_emoji_multilabel(emoji_dir: Path, emojibase_dir: Path, out_dir: Path, seed: int) -> dict:
    """Write the multi-label emoji set (images/ + labels.csv); return per-label counts and provenance."""
    img_dir = emoji_dir / EMOJI_IMG_SUBDIR
    tags_by_code = {e["hexcode"]: set(e.get("tags") or []) for e in
                    json.loads((emojibase_dir / "en" / "data.json").read_text(encoding="utf-8"))}
    entries = json.loads((emoji_dir / "emoji.json").read_text(encoding="utf-8"))
    labelled: list[tuple[str, tuple[str, ...], Path]] = []
    for e in sorted(entries, key=lambda e: e["short_name"]):
        if not e.get("has_img_google") or not (img_dir / e["image"]).is_file():
            continue
        tags = tags_by_code.get(e["unified"].upper())
        if tags is None and e.get("non_qualified"):
            tags = tags_by_code.get(e["non_qualified"].upper())
        if tags is None:
            continue
        labels = tuple(sorted(k for k, rule in ML_LABELS.items() if rule(e.get("subcategory") or "", tags)))
        if labels:
            labelled.append((e["short_name"], labels, img_dir / e["image"]))
    chosen = [r for r in labelled if len(r[1]) > 1]
    count = {k: sum(1 for r in chosen if k in r[1]) for k in ML_LABELS}
    rng = random.Random(f"{seed}-emoji-multilabel")
    for label in ML_LABELS:
        singles = [r for r in labelled if r[1] == (label,)]
        rng.shuffle(singles)
        n = max(ML_PER_LABEL - count[label], min(ML_MIN_SINGLES, len(singles)))
        chosen += singles[:n]
        count[label] += len(singles[:n])
    chosen.sort(key=lambda r: r[0])
    target = out_dir / "emoji_multilabel"
    _reset_dir(target)
    (target / "images").mkdir(parents=True)
    lines = ["path,labels"]
    for name, labels, src in chosen:
        shutil.copyfile(src, target / "images" / f"{name}.png")
        lines.append(f"images/{name}.png,{';'.join(labels)}")
    (target / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pkg = json.loads((emojibase_dir / "package.json").read_text()) if (emojibase_dir / "package.json").is_file() else {}
    lic = emojibase_dir / "LICENSE"
    return {"counts": count, "dir": target, "images": len(chosen),
            "multi": sum(1 for r in chosen if len(r[1]) > 1), "emojibase_version": pkg.get("version"),
            "emojibase_license": lic.read_text(encoding="utf-8") if lic.is_file() else None}


def write_emoji_multilabel_license(target: Path, emoji_license_text: str | None, emojibase_license: str | None) -> None:
    if emoji_license_text is None:
        emoji_license_text = "The MIT License (MIT)\n\nCopyright (c) 2013 Cal Henderson\n\n" + MIT_TEXT
    if emojibase_license is None:
        emojibase_license = "The MIT License (MIT)\n\nCopyright (c) 2017-2019 Miles Johnson\n\n" + MIT_TEXT
    (target / "LICENSE").write_text(f"""\
Multi-label emoji sample (sample_data/emoji_multilabel)
=======================================================

1. Images (images/*.png): Noto Emoji, Copyright Google Inc., licensed under the
   Apache License, Version 2.0, https://www.apache.org/licenses/LICENSE-2.0
   https://github.com/googlefonts/noto-emoji
   Copied unchanged from the npm package {EMOJI_NPM_PACKAGE}@{EMOJI_NPM_VERSION}.

2. Labels (labels.csv) are derived from the emoji metadata of
   {EMOJI_NPM_PACKAGE} (emoji-data by Cal Henderson, MIT) and the English tags
   of {EMOJIBASE_NPM_PACKAGE}@{EMOJIBASE_NPM_VERSION} (Emojibase by Miles Johnson, MIT).

LICENSE of {EMOJI_NPM_PACKAGE} (emoji-data, MIT):

{emoji_license_text.rstrip()}

LICENSE of {EMOJIBASE_NPM_PACKAGE} (MIT):

{emojibase_license.rstrip()}
""", encoding="utf-8")


def write_emoji_license(target: Path, emoji_license_text: str | None) -> None:
    if emoji_license_text is None:
        emoji_license_text = "The MIT License (MIT)\n\nCopyright (c) 2013 Cal Henderson\n\n" + MIT_TEXT
    text = f"""\
Emoji sample (sample_data/emoji)
================================

This folder contains two kinds of third-party material under two licences.

1. Emoji images: Noto Emoji, Copyright Google Inc. / Google LLC,
   https://github.com/googlefonts/noto-emoji
   Licence: Apache License, Version 2.0.
   Full text: https://www.apache.org/licenses/LICENSE-2.0
   (also https://github.com/googlefonts/noto-emoji/blob/main/LICENSE)
   The PNG files are copied unchanged.

2. Packaging, file selection and metadata (image files, short names,
   categories): emoji-data / emoji-datasource by Cal Henderson (iamcal),
   https://github.com/iamcal/emoji-data, distributed on npm as
   {EMOJI_NPM_PACKAGE}@{EMOJI_NPM_VERSION}.
   Licence: MIT. Its LICENSE file is reproduced verbatim below.

The images were selected by scripts/build_sample_data.py from
{EMOJI_NPM_PACKAGE}@{EMOJI_NPM_VERSION}, directory {EMOJI_IMG_SUBDIR.as_posix()}/.

------------------------------------------------------------------------------
LICENSE of {EMOJI_NPM_PACKAGE} (emoji-data, MIT):
------------------------------------------------------------------------------

{emoji_license_text.rstrip()}
"""
    (target / "LICENSE").write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------
# README and summary
# --------------------------------------------------------------------------
def write_readme(out_dir: Path, fashion: dict, emoji: dict, deb_version: str | None, seed: int,
                 multilabel: dict | None = None) -> None:
    tr, te = FASHION_PER_CLASS["train"], FASHION_PER_CLASS["test"]
    n_train = sum(fashion["counts"]["train"].values())
    n_test = sum(fashion["counts"]["test"].values())
    n_emoji = sum(emoji["counts"].values())
    fashion_classes = "\n".join(
        f"| {label} | `{name}` | {fashion['counts']['train'][name]} | {fashion['counts']['test'][name]} |"
        for label, name in enumerate(FASHION_CLASSES)
    )
    emoji_classes = "\n".join(
        f"| `{name}` | {EMOJI_CLASS_DOC[name]} | {emoji['counts'][name]} |" for name in EMOJI_CLASSES
    )
    sources = "\n".join(f"| `{name}` | `{digest}` |" for name, digest in sorted(fashion["sources"].items()))
    text = f"""\
# Sample data

Three small, real image datasets for trying out TL Studio without downloading
anything. Two use the folder-per-class layout (`<class>/<image>.png`); the
third, `emoji_multilabel/`, is multi-label (`labels.csv` of `path,labels`).

Everything here is generated by

```
python scripts/build_sample_data.py
```

which is deterministic (fixed seed {seed}, sorted inputs) and idempotent (it
deletes and rebuilds `fashion_mnist/`, `emoji/` and `emoji_multilabel/` and rewrites this file).
Options: `--fashion-dir DIR` (folder holding the Fashion-MNIST
`*-idx?-ubyte.gz` files; default `{DEFAULT_FASHION_DIR}`), `--emojibase-dir DIR` (an extracted
`{EMOJIBASE_NPM_PACKAGE}` npm package; default: `npm pack {EMOJIBASE_NPM_PACKAGE}@{EMOJIBASE_NPM_VERSION}`), `--emoji-dir DIR`
(an extracted `{EMOJI_NPM_PACKAGE}` npm package; if omitted the script runs
`npm pack {EMOJI_NPM_PACKAGE}@{EMOJI_NPM_VERSION}` and extracts it), `--seed N`.

## `fashion_mnist/` - Fashion-MNIST subset ({n_train} train + {n_test} test images)

Zalando's Fashion-MNIST article images: 28x28 8-bit grayscale PNG (mode `L`),
pixel values exactly as in the original IDX files (white object on black
background). 10 classes; {tr} images per class in `train/` drawn at random
from the Fashion-MNIST *training* set and {te} per class in `test/` drawn from
the Fashion-MNIST *test* set, so `test/` is a genuine held-out split. File
names are `<class>_<index>.png`, `<index>` being the image's position in the
original IDX file.

```
fashion_mnist/
  LICENSE
  train/<class>/<class>_<index>.png   ({tr} per class)
  test/<class>/<class>_<index>.png    ({te} per class)
```

| label | class folder | train | test |
|---|---|---|---|
{fashion_classes}

- Provenance: Debian package `{FASHION_DEB_PACKAGE}` (version
  `{deb_version or 'unknown'}`), files in `{DEFAULT_FASHION_DIR}`; upstream
  https://github.com/zalandoresearch/fashion-mnist. SHA-256 of the inputs:

| file | sha256 |
|---|---|
{sources}

- Licence: MIT, Copyright (c) 2017 Zalando SE (Zalando Research). See
  `fashion_mnist/LICENSE`.

## `emoji/` - Noto emoji, 5 classes ({n_emoji} images)

64x64 RGBA PNG emoji images from Google's Noto Emoji set, copied byte-for-byte
from the npm package `{EMOJI_NPM_PACKAGE}@{EMOJI_NPM_VERSION}`
(`{EMOJI_IMG_SUBDIR.as_posix()}/`). The images keep their transparent
background on purpose, to exercise alpha-channel handling. Classes are
defined by the `subcategory` field of the package's `emoji.json`; only base
entries with `has_img_google: true` are used (no skin-tone variants), and
{EMOJI_PER_CLASS} per class are drawn at random. Files are named
`<class>/<short_name>.png` after the emoji's `short_name`.

```
emoji/
  LICENSE
  <class>/<short_name>.png   ({EMOJI_PER_CLASS} per class)
```

| class folder | emoji.json subcategories | images |
|---|---|---|
{emoji_classes}

There is no separate test split; split it in the app (e.g. 80/20).

- Provenance: npm package `{EMOJI_NPM_PACKAGE}@{EMOJI_NPM_VERSION}`
  (https://github.com/iamcal/emoji-data); images from
  https://github.com/googlefonts/noto-emoji.
- Licences: the Noto Emoji images are Apache-2.0 (Google); emoji-datasource
  (packaging and metadata) is MIT (Cal Henderson / iamcal). See `emoji/LICENSE`.
"""
    if multilabel is not None:
        rows = "\n".join(f"| `{k}` | {ML_LABEL_DOC[k]} | {multilabel['counts'][k]} |" for k in ML_LABELS)
        text += f"""
## `emoji_multilabel/` - Noto emoji, multi-label ({multilabel['images']} images, 8 labels)

The same 64x64 RGBA Noto emoji PNGs (copied byte-for-byte from
`{EMOJI_NPM_PACKAGE}@{EMOJI_NPM_VERSION}`), each with a *set* of labels.
`labels.csv` has one `path,labels` row per image, the labels joined by `;`
(e.g. `images/dog.png,animal;face`). A label is given by the emoji's
`subcategory` in the package's `emoji.json` and its English tags in the npm
package `{EMOJIBASE_NPM_PACKAGE}@{EMOJIBASE_NPM_VERSION}` (`en/data.json`), by the rules below.
Every emoji with two or more labels is kept ({multilabel['multi']} images); single-label
emoji are then drawn (seeded) until each label is on {ML_PER_LABEL} images or has
{ML_MIN_SINGLES} single-label images.

```
emoji_multilabel/
  LICENSE
  labels.csv                  (path,labels)
  images/<short_name>.png
```

| label | rule | images |
|---|---|---|
{rows}

- Provenance: npm packages `{EMOJI_NPM_PACKAGE}@{EMOJI_NPM_VERSION}` (images, subcategories) and
  `{EMOJIBASE_NPM_PACKAGE}@{EMOJIBASE_NPM_VERSION}` (https://github.com/milesj/emojibase; tags).
- Licences: images Apache-2.0 (Google, Noto Emoji); emoji-datasource metadata MIT
  (Cal Henderson); emojibase-data MIT (Miles Johnson). See `emoji_multilabel/LICENSE`.
"""
    (out_dir / "README.md").write_text(text, encoding="utf-8")


def _tree_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def _du_bytes(path: Path) -> int | None:
    """Disk usage as reported by ``du`` (block-rounded), if du is available."""
    try:
        result = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=False)
    except OSError:
        return None
    if result.returncode != 0:
        return None
    return int(result.stdout.split()[0]) * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--fashion-dir", type=Path, default=DEFAULT_FASHION_DIR,
        help=f"folder with the Fashion-MNIST idx(.gz) files (default: {DEFAULT_FASHION_DIR}, "
             f"from the Debian package {FASHION_DEB_PACKAGE})",
    )
    parser.add_argument(
        "--emojibase-dir", type=Path, default=None,
        help=f"extracted {EMOJIBASE_NPM_PACKAGE} npm package (contains en/data.json); if omitted, fetched with npm pack",
    )
    parser.add_argument(
        "--emoji-dir", type=Path, default=None,
        help=f"extracted {EMOJI_NPM_PACKAGE} npm package (contains emoji.json and "
             f"{EMOJI_IMG_SUBDIR.as_posix()}/); if omitted, fetched with npm pack",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default: {DEFAULT_SEED})")
    args = parser.parse_args(argv)

    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)

    try:
        deb_version = None
        if args.fashion_dir.resolve() == DEFAULT_FASHION_DIR:
            deb_version = _debian_package_version(FASHION_DEB_PACKAGE)
        fashion = build_fashion_mnist(args.fashion_dir, out_dir, args.seed)
        write_fashion_license(fashion["dir"], deb_version)

        with tempfile.TemporaryDirectory(prefix="tl_emoji_") as tmp:
            emoji_dir = args.emoji_dir if args.emoji_dir is not None else fetch_emoji_package(Path(tmp))
            emoji = build_emoji(emoji_dir, out_dir, args.seed)
            base_dir = (args.emojibase_dir if args.emojibase_dir is not None
                        else fetch_emojibase_package(Path(tmp) / "emojibase"))
            multilabel = build_emoji_multilabel(emoji_dir, base_dir, out_dir, args.seed)
        write_emoji_license(emoji["dir"], emoji["license_text"])
        write_emoji_multilabel_license(multilabel["dir"], emoji["license_text"], multilabel["emojibase_license"])

        write_readme(out_dir, fashion, emoji, deb_version, args.seed, multilabel)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    # ---- summary ----
    print(f"sample data written to {out_dir}")
    for split in ("train", "test"):
        c = fashion["counts"][split]
        print(f"  fashion_mnist/{split}: {sum(c.values())} images, {len(c)} classes "
              f"({', '.join(f'{k}={v}' for k, v in c.items())})")
    c = emoji["counts"]
    print(f"  emoji: {sum(c.values())} images, {len(c)} classes "
          f"({', '.join(f'{k}={v}' for k, v in c.items())})")
    c = multilabel["counts"]
    print(f"  emoji_multilabel: {multilabel['images']} images ({multilabel['multi']} with several labels), "
          f"{', '.join(f'{k}={v}' for k, v in c.items())}")
    n_files, n_bytes = _tree_size(out_dir)
    du_bytes = _du_bytes(out_dir)
    du_note = f", {du_bytes / 1024:.0f} KiB on disk (du)" if du_bytes is not None else ""
    print(f"  total: {n_files} files, {n_bytes / 1024:.0f} KiB{du_note}")
    if max(n_bytes, du_bytes or 0) >= SIZE_LIMIT_BYTES:
        print(f"error: sample data exceeds {SIZE_LIMIT_BYTES // (1024 * 1024)} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
