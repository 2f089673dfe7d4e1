"""Helpers for the fuzz harnesses (tests/test_fuzz_*.py): budgets that follow the hypothesis
profile, a hard per-example time limit, a memory cap, seed image files and crafted headers."""

from __future__ import annotations

import contextlib
import io
import signal
import struct
import sys
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

try:
    import resource
except ImportError:  # not on Windows: memory_cap is then a no-op
    resource = None  # type: ignore[assignment]

REPO = Path(__file__).resolve().parent.parent
REAL_PHOTO = REPO / "data" / "flowers-mini" / "test" / "51" / "image_01314.jpg"


def fuzz_budget(factor: float = 1.0) -> int:
    """Examples for one harness: ``factor`` times the loaded profile's max_examples (the ``ci``
    profile: 100, ``long``: 2000), so ``--hypothesis-profile=long`` scales every harness."""
    from hypothesis import settings

    return max(1, int(settings.default.max_examples * factor))


class HardTimeout(Exception):
    """An example ran past its hard time limit: a hang."""


@contextlib.contextmanager
def hard_timeout(seconds: float) -> Iterator[None]:
    """Interrupt the block after ``seconds`` of wall time (SIGALRM, main thread, POSIX).

    A soft deadline only notices a slow example once it returns; this one ends a hang (a blocking
    open() or read() is interrupted, since the handler raises)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise HardTimeout(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _vm_data_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextlib.contextmanager
def memory_cap(extra_bytes: int) -> Iterator[bool]:
    """Let the process allocate at most ``extra_bytes`` more (RLIMIT_DATA, Linux 4.7+, which
    counts malloc's and PIL's anonymous mappings); beyond it an allocation fails with
    MemoryError instead of growing. Yields whether the cap is in force (not on other systems)."""
    current = _vm_data_bytes() if sys.platform.startswith("linux") and resource is not None else None
    if current is None:
        yield False
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = current + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    try:
        yield True
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


# --- seed files --------------------------------------------------------------------------------


def _noise(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "F":
        return Image.fromarray(rng.random((height, width), dtype=np.float32) * 300.0 - 20.0, mode="F")
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (height, width), dtype=np.uint8) * 255).convert("1")
    bands = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if bands == 1 else pixels, mode=mode)


def _save(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _palette_with_transparency(size: tuple[int, int]) -> Image.Image:
    image = _noise("RGB", size, 7).quantize(16)
    image.info["transparency"] = 0
    return image


def _frames(count: int, size: tuple[int, int]) -> list[Image.Image]:
    return [_noise("RGB", size, 100 + i) for i in range(count)]


def seed_files(size: tuple[int, int] = (40, 30)) -> dict[str, bytes]:
    """Small valid files of every format and colour mode cnnkit must read, keyed by
    ``name.ext`` (the extension is the format's own), plus a real photo from flowers-mini."""
    frames = _frames(3, size)
    seeds = {
        "rgb.jpg": _save(_noise("RGB", size, 1), "JPEG", quality=80),
        "progressive.jpg": _save(_noise("RGB", size, 2), "JPEG", progressive=True),
        "cmyk.jpg": _save(_noise("CMYK", size, 3), "JPEG"),
        "gray.jpg": _save(_noise("L", size, 4), "JPEG"),
        "rgb.png": _save(_noise("RGB", size, 5), "PNG"),
        "rgba.png": _save(_noise("RGBA", size, 6), "PNG"),
        "la.png": _save(_noise("LA", size, 8), "PNG"),
        "palette-transparent.png": _save(_palette_with_transparency(size), "PNG", transparency=0),
        "gray16.png": _save(_noise("I;16", size, 9), "PNG"),
        "bilevel.png": _save(_noise("1", size, 10), "PNG"),
        "animated.png": _save(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=50),
        "animated.gif": _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0),
        "palette-transparent.gif": _save(_palette_with_transparency(size), "GIF", transparency=0),
        "rgb.bmp": _save(_noise("RGB", size, 11), "BMP"),
        "bilevel.bmp": _save(_noise("1", size, 12), "BMP"),
        "rgb.webp": _save(_noise("RGB", size, 13), "WEBP", quality=70),
        "lossless-rgba.webp": _save(_noise("RGBA", size, 14), "WEBP", lossless=True),
        "animated.webp": _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50),
        "rgb.tif": _save(_noise("RGB", size, 15), "TIFF"),
        "lzw-cmyk.tif": _save(_noise("CMYK", size, 16), "TIFF", compression="tiff_lzw"),
        "float.tif": _save(_noise("F", size, 17), "TIFF"),
        "gray16.tif": _save(_noise("I;16", size, 18), "TIFF"),
        "rgb.ppm": _save(_noise("RGB", size, 19), "PPM"),
        "gray.pgm": _save(_noise("L", size, 20), "PPM"),
    }
    seeds["photo.jpg"] = REAL_PHOTO.read_bytes()
    return seeds


def write_seed_files(folder: Path, seeds: dict[str, bytes]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in seeds.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


# --- crafted headers declaring huge images -------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG (valid CRCs) whose IHDR declares ``width`` x ``height`` RGB pixels and
    whose IDAT holds only a few rows: decoding would allocate the whole declared image."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * min(width, 64)) * 4)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def bmp_declaring(width: int, height: int) -> bytes:
    """A BMP whose BITMAPINFOHEADER declares ``width`` x ``height`` 24-bit pixels, with 48 bytes of data."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    pixels = b"\x7f" * 48
    header = b"BM" + struct.pack("<IHHI", 14 + len(info) + len(pixels), 0, 0, 14 + len(info))
    return header + info + pixels


def gif_declaring(width: int, height: int) -> bytes:
    """A GIF whose screen and single frame declare ``width`` x ``height`` (GIF's maximum is 65535)."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b";"


def jpeg_declaring(width: int, height: int) -> bytes:
    """A baseline JPEG header (SOI, DQT, SOF0, DHT-less SOS) declaring ``width`` x ``height``."""
    dqt = b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" + bytes(range(1, 65))
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    sos = b"\xff\xda" + struct.pack(">HB", 12, 3) + b"\x01\x00\x02\x11\x03\x11\x00\x3f\x00"
    return b"\xff\xd8" + dqt + sof + sos + b"\x00" * 64 + b"\xff\xd9"


def tiff_declaring(width: int, height: int) -> bytes:
    """A little-endian uncompressed 8-bit grayscale TIFF declaring ``width`` x ``height``."""
    data_offset = 8 + 2 + 9 * 12 + 4
    entries = [
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
        (273, 4, 1, data_offset), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 64),
    ]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\x00" * 4
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x80" * 64


def ppm_declaring(width: int, height: int) -> bytes:
    return f"P6\n{width} {height}\n255\n".encode() + b"\x10" * 96


def webp_declaring(width: int, height: int) -> bytes:
    """A valid animated WebP (small frames) whose VP8X canvas declares ``width`` x ``height``
    (WebP's maximum is 16384 a side): frames smaller than the canvas are allowed."""
    frames = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(2)]
    data = bytearray(_save(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50))
    assert data[12:16] == b"VP8X"
    data[24:27] = (width - 1).to_bytes(3, "little")
    data[27:30] = (height - 1).to_bytes(3, "little")
    return bytes(data)


HUGE_HEADERS = {
    "png": png_declaring,
    "bmp": bmp_declaring,
    "gif": gif_declaring,
    "jpg": jpeg_declaring,
    "tif": tiff_declaring,
    "ppm": ppm_declaring,
    "webp": webp_declaring,
}
