"""Fuzzing the one image-decoding path (load_image + build_transforms) that train, predict,
evaluate and serve share, and the DataLoader dataset built on it.

The property, for every input: a float tensor of the configured shape, or a clean one-line
ImageError; never another exception, never a hang (a hard per-example time limit interrupts
one), never a memory blow-up (allocations are capped while an example runs). Example counts
follow the hypothesis profile (tests/conftest.py: ``ci`` by default, ``--hypothesis-profile=long``
for 20x more).
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import event, example, given, settings  # noqa: E402
from hypothesis import strategies as st

from cnnkit.config import PreprocessConfig  # noqa: E402
from cnnkit.data.folders import ImageDataset, collate  # noqa: E402
from cnnkit.data.transforms import IMAGE_EXTENSIONS, build_transforms, load_image  # noqa: E402
from cnnkit.errors import ImageError  # noqa: E402

from fuzz_helpers import (  # noqa: E402
    HUGE_HEADERS,
    REAL_PHOTO,
    fuzz_budget,
    hard_timeout,
    memory_cap,
    seed_files,
    write_seed_files,
)

CFG = PreprocessConfig(image_size=32, resize_size=36)  # the default max_pixels, as users have it
PIPELINES = {train: build_transforms(CFG, train) for train in (False, True)}
SEEDS = seed_files()
SEED_NAMES = sorted(SEEDS)
EXTENSIONS = sorted({*IMAGE_EXTENSIONS, ".txt", ".pt", ""})  # wrong extensions too
EXAMPLE_SECONDS = 10.0  # hard limit per example (a decode here takes milliseconds)
MEMORY_HEADROOM = 1 << 30  # a 32-px pipeline on an image within max_pixels fits in far less


def check_decodes_or_refuses(path: str | os.PathLike, max_pixels: int | None = None) -> str:
    """The property for one file: "ok" (both pipelines give a finite 3x32x32 float tensor) or
    "refused" (a one-line ImageError); anything else fails the test."""
    with hard_timeout(EXAMPLE_SECONDS), memory_cap(MEMORY_HEADROOM):
        try:
            image = load_image(path, max_pixels)
            tensors = [PIPELINES[train](image) for train in (False, True)]
        except ImageError as exc:
            message = str(exc)
            assert message and "\n" not in message, repr(message)
            return "refused"
    assert image.mode == "RGB"
    for tensor in tensors:
        assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
        assert torch.isfinite(tensor).all()
    return "ok"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# --- the seeds themselves ------------------------------------------------------------------------


EXPECTED_MODES = {
    "cmyk.jpg": "CMYK", "lzw-cmyk.tif": "CMYK", "gray16.png": "I;16", "la.png": "LA",
    "palette-transparent.png": "P", "palette-transparent.gif": "P", "bilevel.png": "1", "bilevel.bmp": "1",
    "float.tif": "F", "rgba.png": "RGBA", "gray.pgm": "L",
}


def test_every_seed_decodes_and_covers_its_format_and_mode(scratch):
    """The seeds are good files of the formats and colour modes the fuzzers mutate."""
    paths = write_seed_files(scratch / "seeds", SEEDS)
    for name, path in paths.items():
        with Image.open(path) as image:
            if name in EXPECTED_MODES:
                assert image.mode.startswith(EXPECTED_MODES[name]), (name, image.mode)
            if name.startswith("animated"):
                assert getattr(image, "n_frames", 1) == 3, name
            if name.startswith("palette"):
                assert "transparency" in image.info, name
        assert check_decodes_or_refuses(path) == "ok", name
    assert Image.open(paths["photo.jpg"]).size == Image.open(REAL_PHOTO).size


def test_every_seed_decodes_the_same_under_every_wrong_extension(scratch):
    """Formats are recognised by content: a PNG named .jpg (or .txt, or nothing) is still read."""
    folder = scratch / "renamed"
    folder.mkdir()
    for name, data in SEEDS.items():
        reference = np.asarray(load_image(write_seed_files(folder, {name: data})[name]))
        for ext in EXTENSIONS:
            path = folder / f"{name.replace('.', '_')}{ext}"
            path.write_bytes(data)
            assert check_decodes_or_refuses(path) == "ok", path.name
            assert np.array_equal(np.asarray(load_image(path)), reference), path.name


# --- hypothesis: random bytes and mutated real files --------------------------------------------


@settings(max_examples=fuzz_budget(5))
@given(data=st.binary(min_size=0, max_size=4096), ext=st.sampled_from(EXTENSIONS))
@example(data=b"", ext=".jpg")
@example(data=b"\x89PNG\r\n\x1a\n", ext=".png")  # a bare signature
@example(data=b"GIF89a", ext=".gif")
@example(data=b"BM", ext=".bmp")
@example(data=b"RIFF\x00\x00\x00\x00WEBP", ext=".webp")
@example(data=b"II*\x00", ext=".tif")
@example(data=b"\xff\xd8\xff", ext=".jpg")
def test_random_bytes_are_refused_cleanly(scratch, data, ext):
    path = scratch / f"random{ext}"
    path.write_bytes(data)
    event(check_decodes_or_refuses(path))


@st.composite
def mutated_seed(draw) -> tuple[str, bytes]:
    """A seed file with 1-4 mutations: bit flips, byte insertions, deletions, overwrites and a
    truncation, at offsets biased towards the headers (the first 256 bytes), where parsers decide."""
    name = draw(st.sampled_from(SEED_NAMES))
    data = bytearray(SEEDS[name])
    ops = draw(st.lists(st.sampled_from(["flip", "insert", "delete", "overwrite", "truncate"]), min_size=1, max_size=4))
    for op in ops:
        size = max(len(data), 1)
        offset = draw(st.one_of(st.integers(0, min(size, 256) - 1), st.integers(0, size - 1)))
        if op == "flip" and data:
            data[offset] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[offset:offset] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete" and data:
            del data[offset:offset + draw(st.integers(1, 64))]
        elif op == "overwrite" and data:
            chunk = draw(st.sampled_from([b"\x00\x00", b"\xff\xff", b"\x7f\xff\xff\xff", b"\xff\xff\xff\xff", b"\x00\x00\x00\x01"]))
            data[offset:offset + len(chunk)] = chunk
        elif op == "truncate":
            del data[offset:]
    return name, bytes(data)


@settings(max_examples=fuzz_budget(20))
@given(mutant=mutated_seed(), keep_extension=st.booleans())
def test_mutated_images_decode_or_are_refused_cleanly(scratch, mutant, keep_extension):
    name, data = mutant
    path = scratch / (f"mutant-{name}" if keep_extension else "mutant.jpg")
    path.write_bytes(data)
    event(check_decodes_or_refuses(path))


def test_truncation_at_spread_offsets_of_every_seed(scratch):
    """Every seed cut at 24 offsets (evenly spread, plus the first and last few bytes): a
    truncated file is refused or, when the cut is in trailing metadata, still decoded."""
    outcomes = {"ok": 0, "refused": 0}
    path = scratch / "cut.bin"
    for name, data in SEEDS.items():
        offsets = sorted({*np.linspace(0, len(data) - 1, 16, dtype=int).tolist(), 1, 2, 8, len(data) - 1, len(data) - 2,
                          len(data) - 8, len(data) // 3, len(data) // 2})
        for offset in offsets:
            path.write_bytes(data[:offset])
            outcomes[check_decodes_or_refuses(path)] += 1
    assert outcomes["refused"] > len(SEEDS) * 10  # truncation really was exercised


def _retyped_tiff_tag(tag: int, new_type: int) -> bytes:
    data = bytearray(SEEDS["rgb.tif"])
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry:entry + 2])[0] == tag:
            data[entry + 2:entry + 4] = struct.pack("<H", new_type)
            return bytes(data)
    raise AssertionError(f"no tag {tag}")


def test_tiff_whose_strip_offset_is_a_fraction_is_refused(scratch):
    """Found by the mutation fuzzer: a TIFF whose StripOffsets tag is retyped RATIONAL makes PIL
    seek to a fraction, a TypeError, which escaped load_image and ended predict (exit 1)."""
    path = scratch / "rational-offset.tif"
    path.write_bytes(_retyped_tiff_tag(273, 5))
    with pytest.raises(ImageError, match=r"corrupt image \(TypeError"):
        load_image(path)


@pytest.mark.parametrize("ext", sorted(IMAGE_EXTENSIONS))
def test_zero_byte_files_are_refused(scratch, ext):
    path = scratch / f"empty{ext}"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="not an image"):
        load_image(path)


# --- huge declared dimensions: refused before decoding -------------------------------------------


HUGE_CASES = [
    (fmt, size) for fmt in sorted(HUGE_HEADERS)
    for size in ([(65535, 65535), (9500, 9500)] if fmt in ("gif", "jpg") else  # 16-bit dimensions
                 [(16384, 16384), (9500, 9500)] if fmt == "webp" else
                 [(100000, 100000), (9500, 9500), (1, 100_000_000)])
]  # 9500x9500 is just over cnnkit's 89.5 M limit and under PIL's own 2x bomb threshold


@pytest.mark.parametrize("fmt, size", HUGE_CASES, ids=[f"{f}-{w}x{h}" for f, (w, h) in HUGE_CASES])
def test_huge_declared_dimensions_are_refused_before_decoding(scratch, monkeypatch, fmt, size):
    path = scratch / f"huge.{fmt}"
    path.write_bytes(HUGE_HEADERS[fmt](*size))
    decoded = []
    Image.init()
    plugins = {factory for factory, _ in Image.OPEN.values() if isinstance(factory, type) and "load" in vars(factory)}
    for cls in {ImageFile.ImageFile, *plugins}:  # every decoder entry point
        real = cls.load
        monkeypatch.setattr(cls, "load", lambda self, real=real: decoded.append(type(self).__name__) or real(self))
    # The declared image needs 0.3 to 40 GB: 64 MB proves that none of it is allocated. Except
    # that libwebp reserves (calloc, untouched: no resident memory) two canvas buffers when PIL
    # creates its decoder, before cnnkit sees the size; PIL itself refuses canvases over its own
    # bomb threshold (2 x 89 M pixels) first, so that reservation is bounded (docs/RELIABILITY.md).
    cap = 64 << 20 if fmt != "webp" else (64 << 20) + 8 * size[0] * size[1]
    with hard_timeout(EXAMPLE_SECONDS), memory_cap(cap):
        with pytest.raises(ImageError, match="too large") as info:
            load_image(path)
    assert "\n" not in str(info.value)
    assert decoded == [], f"pixels were decoded before the size was checked: {decoded}"


def test_a_smaller_configured_limit_is_enforced_before_decoding(scratch):
    path = scratch / "medium.png"
    path.write_bytes(HUGE_HEADERS["png"](3000, 3000))
    with memory_cap(16 << 20):  # 3000x3000 RGB would need 36 MB
        with pytest.raises(ImageError, match=r"too large: 3000x3000 pixels \(limit 1,000,000\)"):
            load_image(path, max_pixels=1_000_000)


def test_rescaling_high_bit_depth_images_holds_at_most_one_float32_copy(scratch):
    """16-bit and float images are rescaled to 8 bits in numpy. At the pixel limit (89 M pixels)
    every float64 copy costs 716 MB, so the rescale must not make several: it may hold the raw
    pixels and one float32 working copy (tracemalloc sees numpy's and Python's allocations)."""
    import tracemalloc

    width, height = 2000, 1000
    gradient = (np.arange(width * height, dtype=np.uint64) * 37 % 65536).astype(np.uint16).reshape(height, width)
    files = {"gray16.png": Image.fromarray(gradient), "float.tif": Image.fromarray(gradient.astype(np.float32) / 65535, mode="F")}
    for name, image in files.items():
        path = scratch / name
        image.save(path)
        tracemalloc.start()
        try:
            decoded = load_image(path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert decoded.mode == "RGB" and decoded.size == (width, height)
        per_pixel = peak / (width * height)
        assert per_pixel <= 10, f"{name}: rescaling peaked at {per_pixel:.1f} bytes a pixel"


# --- special files: nothing may hang -------------------------------------------------------------


def _special_files(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    files = {"fifo": folder / "fifo.jpg", "self-loop": folder / "loop.jpg", "dangling": folder / "dangling.png",
             "directory": folder / "folder.jpg", "loop-a": folder / "a.png"}
    os.mkfifo(files["fifo"])
    os.symlink("loop.jpg", files["self-loop"])
    os.symlink("nowhere.png", files["dangling"])
    files["directory"].mkdir()
    os.symlink("b.png", files["loop-a"])
    os.symlink("a.png", folder / "b.png")
    if os.path.exists("/dev/zero"):
        files["device"] = Path("/dev/zero")
    return files


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes and symlinks (POSIX)")
def test_fifos_symlink_loops_devices_and_folders_are_refused_without_hanging(scratch):
    for kind, path in _special_files(scratch / "special").items():
        try:
            outcome = check_decodes_or_refuses(path)
        except Exception as exc:  # noqa: BLE001 - report which kind failed
            pytest.fail(f"{kind}: {type(exc).__name__}: {exc}")
        assert outcome == "refused", kind
    with pytest.raises(ImageError, match="symbolic links"):
        load_image(scratch / "special" / "loop.jpg")


def test_a_named_pipe_with_a_writer_is_still_read(scratch):
    """`cnnkit predict <(curl ...)` passes /dev/fd/N, a pipe: guarding against FIFOs without a
    writer must not stop a pipe that has one from being read."""
    read_end, write_end = os.pipe()
    data = SEEDS["rgb.png"]
    pid = os.fork()
    if pid == 0:  # child: write the image and leave
        os.close(read_end)
        os.write(write_end, data)
        os._exit(0)
    os.close(write_end)
    try:
        assert check_decodes_or_refuses(f"/dev/fd/{read_end}") == "ok"
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)


# --- the DataLoader path: per-file error tuples, never an exception -------------------------------


@settings(max_examples=fuzz_budget(3))
@given(mutants=st.lists(mutated_seed(), min_size=1, max_size=6), train=st.booleans())
def test_image_dataset_reports_bad_files_and_never_raises(scratch, mutants, train):
    folder = Path(tempfile.mkdtemp(dir=scratch))
    paths = []
    for i, (name, data) in enumerate(mutants):
        paths.append(str(folder / f"{i}-{name}"))
        Path(paths[-1]).write_bytes(data)
    dataset = ImageDataset(paths, PIPELINES[train], targets=list(range(len(paths))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate)
    seen = 0
    with hard_timeout(EXAMPLE_SECONDS * len(paths)), memory_cap(MEMORY_HEADROOM):
        for images, targets, errors in loader:
            good = [e is None for e in errors]
            assert (images is None) == (not any(good))
            if images is not None:
                assert images.shape == (sum(good), 3, 32, 32)
            for target, error in zip(targets.tolist(), errors):
                assert error is None or (error[0] == paths[target] and error[1] and "\n" not in error[1])
            seen += len(errors)
    assert seen == len(paths)
    shutil.rmtree(folder)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes and symlinks (POSIX)")
def test_image_dataset_in_worker_processes_reports_every_bad_file(scratch):
    """The same through real DataLoader workers (as predict and train use them): every bad file
    comes back as an error tuple naming it, the good ones as tensors, in order."""
    folder = scratch / "workers"
    specials = _special_files(folder)
    specials.pop("device", None)
    good = write_seed_files(folder, {k: SEEDS[k] for k in ("rgb.jpg", "gray16.png", "animated.gif", "photo.jpg")})
    bad = {"truncated.png": SEEDS["rgb.png"][:100], "garbage.jpg": os.urandom(500), "empty.webp": b"",
           "rational-offset.tif": _retyped_tiff_tag(273, 5)}
    bad_paths = write_seed_files(folder, bad)
    paths = [str(p) for p in [*good.values(), *bad_paths.values(), *specials.values()]]
    loader = torch.utils.data.DataLoader(ImageDataset(paths, PIPELINES[False]), batch_size=3, num_workers=2,
                                         collate_fn=collate, timeout=60)
    errors = []
    n_images = 0
    with hard_timeout(120):
        for images, _, batch_errors in loader:
            n_images += 0 if images is None else len(images)
            errors += batch_errors
    assert n_images == len(good)
    assert [e is None for e in errors] == [True] * len(good) + [False] * (len(paths) - len(good))
    assert [e[0] for e in errors if e] == paths[len(good):]
