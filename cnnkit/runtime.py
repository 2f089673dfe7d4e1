"""Where code runs: the device, the cores it may use, worker counts and seeding; the --output
folder of the commands that write one.

torch is imported where a function needs it, not here: scoring an exported model uses this module
and never imports torch (its import is seconds of every short ``cnnkit predict``).
"""

from __future__ import annotations

import os
import queue
import random
import sys
import threading
from typing import TYPE_CHECKING, Iterable, Iterator, TypeVar

import numpy as np

from .errors import ConfigError, OutputError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; an unavailable device is a ConfigError."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps: Apple MPS is not available on this machine; use --device cpu or auto")
    return torch.device(name)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def compute_threads() -> int:
    """The threads a runtime (torch, ONNX Runtime, OpenVINO) computes with: torch's setting where
    torch is loaded (the server sizes it per worker), else one per available core."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else available_cores()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_vnni() -> bool:
    """Whether the CPU has int8 dot-product instructions (AVX-512 VNNI or AVX-VNNI); without
    them, u8 x s8 products can saturate, so int8 weights keep 7 bits (``reduce_range``)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def has_native_bfloat16() -> bool:
    """Whether the CPU computes bfloat16 in hardware (AMX or AVX512-BF16): there bfloat16
    autocast trains a CNN about 1.8x faster than float32; elsewhere it is emulated, and slower."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def default_workers(requested: int | None) -> int:
    """DataLoader worker processes: as asked, else one per core up to 4."""
    if requested is not None:
        return requested
    return min(4, available_cores())


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """``items``, each produced by a background thread up to ``depth`` ahead of the consumer.

    For work that releases the GIL on both sides (decoding images beside a forward pass): the
    two overlap on different cores. The producer's exceptions are raised in the consumer; a
    consumer that stops early stops the producer after the item in hand.
    """
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed over and raised where the consumer is
            put((end, exc))
            return
        put((end, None))

    thread = threading.Thread(target=produce, name="cnnkit-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = handoff.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc's ``malloc_trim``).

    A model loaded in one thread and freed after another took its place leaves its pages in
    glibc's per-thread arenas: without the trim a server's resident memory grows with every
    reload although nothing is referenced (benchmarks/RESULTS.md). Elsewhere only the collection runs.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only (not musl, macOS)
            libc.malloc_trim(0)
    except OSError:
        pass


def prepare_output_dir(folder: str, names: list[str], force: bool) -> None:
    """Create ``folder`` (a command's --output), refusing one that already holds any of the files
    ``names`` unless ``force``."""
    existing = [name for name in names if os.path.exists(os.path.join(folder, name))]
    if existing and not force:
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise OutputError(f"{folder} already holds {shown}; use --force or another --output")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create --output {folder}: {exc.strerror or exc}") from None
