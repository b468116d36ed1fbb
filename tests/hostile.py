"""Generators of hostile files for the robustness tests: every file is made by code at test time.

Images: truncated, fake, decompression-bomb headers, odd modes (16-bit, CMYK, palette+transparency, LA,
RGBA), animated, EXIF-rotated. Archives: path traversal, symlink entries, bombs, a lying size header,
the encryption flag, corrupt and truncated zips. Weights: a pickle that would run code, tensors of the
wrong architecture, garbage. Nothing here is committed as a binary blob.
"""

from __future__ import annotations

import io
import os
import pickle
import stat
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

__all__ = [
    "png_bytes", "jpeg_bytes", "noise_image", "png_with_header_size", "truncate", "png_16bit", "cmyk_jpeg",
    "palette_png_transparent", "la_png", "rgba_png", "animated_gif", "exif_rotated_jpeg",
    "write_zip", "zip_with_symlink", "set_zip_flag_bits", "lie_about_sizes", "zip_entries",
    "snapshot", "EvilPickle", "write_evil_pickle", "hammer_store", "claim_until_empty",
]


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------
def noise_image(size: tuple[int, int] = (48, 48), seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A random-noise image (every call with another seed gives other content, so hashes differ)."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    return im if mode == "RGB" else im.convert(mode)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bytes(size: tuple[int, int] = (48, 48), seed: int = 0, mode: str = "RGB") -> bytes:
    return _save(noise_image(size, seed, mode), "PNG")


def jpeg_bytes(size: tuple[int, int] = (48, 48), seed: int = 0, quality: int = 90) -> bytes:
    return _save(noise_image(size, seed), "JPEG", quality=quality)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose IHDR claims ``width`` x ``height`` (valid CRCs): a decompression bomb
    header. Its IDAT holds one compressed row only, so decoding it would also fail; the size must be
    refused before any decoding happens."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" + b"\x00" * 3 * min(width, 1024), 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def truncate(data: bytes, keep: float = 0.5) -> bytes:
    """The first ``keep`` fraction of ``data`` (a download cut short)."""
    return data[: max(1, int(len(data) * keep))]


def png_16bit(size: tuple[int, int] = (40, 30)) -> bytes:
    """A 16-bit grayscale PNG (Pillow mode I;16) with a full-range gradient."""
    w, h = size
    arr = np.tile(np.linspace(0, 65535, w, dtype=np.uint16), (h, 1))
    return _save(Image.frombytes("I;16", (w, h), arr.astype("<u2").tobytes()), "PNG")


def cmyk_jpeg(size: tuple[int, int] = (40, 30)) -> bytes:
    return _save(Image.new("CMYK", size, (0, 255, 255, 0)), "JPEG")  # pure red in CMYK


def palette_png_transparent(size: tuple[int, int] = (32, 32)) -> bytes:
    """Palette PNG: index 0 transparent (must become white), index 1 blue."""
    im = Image.new("P", size, 0)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    for x in range(size[0] // 2):
        for y in range(size[1]):
            im.putpixel((x, y), 1)
    return _save(im, "PNG", transparency=0)


def la_png(size: tuple[int, int] = (32, 32)) -> bytes:
    return _save(Image.new("LA", size, (0, 0)), "PNG")  # fully transparent black: must become white


def rgba_png(size: tuple[int, int] = (32, 32)) -> bytes:
    return _save(Image.new("RGBA", size, (255, 0, 0, 0)), "PNG")  # transparent red: must become white


def animated_gif(size: tuple[int, int] = (32, 32), frames: int = 4) -> bytes:
    ims = [Image.new("RGB", size, c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)][:frames]]
    return _save(ims[0], "GIF", save_all=True, append_images=ims[1:], duration=50, loop=0)


def exif_rotated_jpeg(size: tuple[int, int] = (60, 40), orientation: int = 6) -> bytes:
    """A ``size`` (w, h) JPEG whose EXIF says it must be rotated (6: 90 degrees clockwise on display)."""
    im = noise_image(size, seed=6)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(im, "JPEG", exif=exif.tobytes())


# --------------------------------------------------------------------------------------------------
# archives
# --------------------------------------------------------------------------------------------------
def write_zip(path: str | os.PathLike, entries: Iterable[tuple[str | zipfile.ZipInfo, bytes]],
              compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """Write ``entries`` (name or ZipInfo, bytes) as they are: no name sanitising happens here."""
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in entries:
            if isinstance(name, str):
                name = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
                name.compress_type = compression
            zf.writestr(name, data)
    return path


def zip_with_symlink(path: str | os.PathLike, link_name: str, target: str,
                     extra: Iterable[tuple[str, bytes]] = ()) -> Path:
    """A zip holding a Unix symlink entry ``link_name`` -> ``target`` (as `zip --symlinks` writes it)."""
    info = zipfile.ZipInfo(link_name, date_time=(2024, 1, 1, 0, 0, 0))
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return write_zip(path, [*extra, (info, target.encode())])


def zip_entries(path: str | os.PathLike) -> tuple[bytearray, list[tuple[int, int]]]:
    """The zip's bytes and, per entry, (local header offset, central header offset)."""
    data = bytearray(Path(path).read_bytes())
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        pos = zf.start_dir
    out = []
    for info in infos:
        assert data[pos:pos + 4] == b"PK\x01\x02"
        n, m, k = struct.unpack("<HHH", data[pos + 28:pos + 34])
        out.append((info.header_offset, pos))
        pos += 46 + n + m + k
    return data, out


def set_zip_flag_bits(path: str | os.PathLike, bits: int) -> Path:
    """OR ``bits`` into the general-purpose flags of every entry (0x1 = encrypted), in both headers."""
    data, offs = zip_entries(path)
    for local, central in offs:
        for at in (local + 6, central + 8):
            (flags,) = struct.unpack("<H", data[at:at + 2])
            data[at:at + 2] = struct.pack("<H", flags | bits)
    Path(path).write_bytes(bytes(data))
    return Path(path)


def lie_about_sizes(path: str | os.PathLike, declared: int) -> Path:
    """Rewrite every entry's uncompressed size to ``declared`` in both headers (data unchanged): a zip
    whose real content is larger than its header says."""
    data, offs = zip_entries(path)
    for local, central in offs:
        data[local + 22:local + 26] = struct.pack("<I", declared)
        data[central + 24:central + 28] = struct.pack("<I", declared)
    Path(path).write_bytes(bytes(data))
    return Path(path)


# --------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------
class EvilPickle:
    """Unpickling this runs ``touch <marker>``: a weights file that executes code when loaded."""

    def __init__(self, marker: str | os.PathLike):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_evil_pickle(path: str | os.PathLike, marker: str | os.PathLike, torch_format: bool = True) -> Path:
    """A .pth whose state dict hides an :class:`EvilPickle` (torch.save zip format, or a raw pickle)."""
    import torch

    obj = {"conv.weight": torch.zeros(2, 2), "payload": EvilPickle(marker)}
    if torch_format:
        torch.save(obj, str(path))
    else:
        Path(path).write_bytes(pickle.dumps(obj))
    return Path(path)


# --------------------------------------------------------------------------------------------------
# checking that nothing escaped
# --------------------------------------------------------------------------------------------------
def snapshot(folder: str | os.PathLike, exclude: str | None = None) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of everything under ``folder`` (without following links),
    leaving out the sub-tree named ``exclude``: compare before/after to prove nothing was written."""
    folder = Path(folder)
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        rel_dir = Path(dirpath).relative_to(folder)
        if exclude and rel_dir.parts[:1] == (exclude,):
            continue
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(rel_dir / name)
            if exclude and rel == exclude:
                continue
            st = p.lstat()
            out[rel] = (st.st_size if not p.is_dir() else 0, st.st_mtime_ns if not p.is_dir() else 0)
    return out


# --------------------------------------------------------------------------------------------------
# many processes on one run store (module-level so that multiprocessing's spawn can import them)
# --------------------------------------------------------------------------------------------------
def hammer_store(db_path: str, worker: int, n_runs: int = 10, epochs: int = 3) -> list[str]:
    """One process's share of a concurrent-writers test: per run, create, mark running, add epochs, read
    the list (a reader in the mix), finish. ``n_runs * (epochs + 3)`` writes. Returns the run ids."""
    from tl_core.storage.store import RunStore

    store = RunStore(db_path)  # every process also races to create the schema and switch to WAL
    ids = []
    for i in range(n_runs):
        rid = store.create_run(f"data-{worker}", {"worker": worker, "i": i}, status="queued", owner=f"w{worker}")
        store.update(rid, status="running", pid=os.getpid(), progress={"stage": "train", "i": i})
        for e in range(1, epochs + 1):
            store.add_epoch(rid, e, {"loss": 1.0 / e, "worker": worker})
        store.list()
        store.get(rid)
        store.update(rid, status="done", summary={"i": i, "worker": worker}, pid=None)
        ids.append(rid)
    return ids


def claim_until_empty(db_path: str) -> list[str]:
    """Claim queued runs (as a worker does) until none is left; returns the ids this process got."""
    from tl_core.storage.store import RunStore

    store = RunStore(db_path)
    got = []
    while (rid := store.claim_next(os.getpid())) is not None:
        got.append(rid)
        store.update(rid, status="done", pid=None)
    return got
