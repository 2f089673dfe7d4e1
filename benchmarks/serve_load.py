"""Load benchmark for ``cnnkit serve`` (issue 5), against 127.0.0.1 only.

For each architecture, in one run on one machine:

1. ``cnnkit serve`` with ``--workers 1`` and ``--workers 2`` (defaults otherwise; optionally the
   ONNX export served with onnxruntime, ``--servers ... cnnkit-onnx-w2``), the naive
   tutorial-style server (``naive_server.py``: Flask's threaded server, one image per forward
   pass) and the same naive app under gunicorn with 2 sync workers;
2. for each, a bounded load: a fixed number of single-image POST /predict requests (multipart
   JPEG, 500x375 photos from the bundled flowers) at concurrency 1, 8 and 32, each level capped
   at ``--max-seconds``; requests/s, p50/p95/p99 latency, errors, and for cnnkit the mean batch
   size its forward passes reached (from its /metrics);
3. the limit: the bare model's forward-only images/s on ready-made tensors, at the batch size
   each level's forward passes had (cnnkit: the mean it reached; naive: 1), measured while no
   server runs, using all cores two ways (one process with a thread per core, and one 1-thread
   process per core, summed) and taking the better; each is the best rate over 1-second windows.

Weights are random (``weights none``): throughput does not depend on their values.

    python benchmarks/serve_load.py --archs resnet18 densenet121 --requests 96

Prints Markdown tables (for benchmarks/RESULTS.md) and writes benchmarks/out/serve_load.json.
"""

from __future__ import annotations

import argparse
import http.client
import io
import itertools
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FLOWERS = REPO / "data" / "flowers-mini"
HOST = "127.0.0.1"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def make_checkpoint(arch: str, path: Path) -> None:
    from cnnkit.data.transforms import resolve_preprocess
    from cnnkit.models.build import build_model
    from cnnkit.models.checkpoint import Checkpoint, library_versions

    torch.manual_seed(0)
    model, head = build_model(arch, 5, "none")
    Checkpoint(
        arch=arch, head=head, state_dict=model.state_dict(), classes=[f"c{i}" for i in range(5)],
        preprocess=resolve_preprocess(arch), versions=library_versions(),
    ).save(path)


def make_payloads(count: int) -> list[tuple[bytes, str]]:
    """Multipart bodies, each one 500x375 JPEG made from the bundled photos."""
    sources = sorted(FLOWERS.glob("*/*/*.jpg"))[:count]
    bodies = []
    for src in sources:
        buffer = io.BytesIO()
        Image.open(src).convert("RGB").resize((500, 375), Image.BICUBIC).save(buffer, "JPEG", quality=90)
        boundary = uuid.uuid4().hex
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{src.name}"\r\n'
                "Content-Type: image/jpeg\r\n\r\n").encode() + buffer.getvalue() + f"\r\n--{boundary}--\r\n".encode()
        bodies.append((body, f"multipart/form-data; boundary={boundary}"))
    return bodies


def post(port: int, payload: tuple[bytes, str], timeout: float = 120) -> bool:
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request("POST", "/predict", payload[0], {"Content-Type": payload[1]})
        answer = connection.getresponse()
        answer.read()
        return answer.status == 200
    except OSError:
        return False
    finally:
        connection.close()


def get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def batch_metrics(port: int) -> tuple[float, float]:
    """(images, forward passes) so far, from a cnnkit server's /metrics."""
    from cnnkit.serve import iter_metric_samples

    _, body = get(port, "/metrics")
    values = {name: value for name, labels, value in iter_metric_samples(body.decode()) if not labels}
    return values.get("cnnkit_batch_size_sum", 0.0), values.get("cnnkit_batch_size_count", 0.0)


# --- servers --------------------------------------------------------------------------------


def start_server(kind: str, checkpoint: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "CKPT": str(checkpoint), "PYTHONUNBUFFERED": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if kind.startswith("cnnkit"):
        workers = kind.rsplit("-w", 1)[1]
        model = checkpoint.with_suffix(".onnx") if "onnx" in kind else checkpoint
        if "onnx" in kind and not model.exists():
            subprocess.run([sys.executable, "-m", "cnnkit", "-q", "export", str(checkpoint), "-o", str(model)],
                           check=True, stdout=subprocess.DEVNULL)
        args = [sys.executable, "-m", "cnnkit", "serve", str(model), "--port", str(port),
                "--workers", workers, "--device", "cpu"]
    elif kind == "naive":
        args = [sys.executable, str(REPO / "benchmarks" / "naive_server.py"), "--port", str(port)]
    elif kind == "naive-gunicorn-w2":
        from gunicorn.config import Config

        args = [sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"{HOST}:{port}", "--timeout", "300",
                "--chdir", str(REPO / "benchmarks"), "naive_server:app"]
        if "control_socket_disable" in Config().settings:
            args.insert(3, "--no-control-socket")
    else:
        raise ValueError(kind)
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_ready(port: int, process: subprocess.Popen, payload, workers: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if post(port, payload, timeout=30):
                break
        except OSError:
            pass
        time.sleep(0.2)
    else:
        raise RuntimeError("server not ready in time")
    # Every worker warmed up: as many concurrent requests, twice, as workers x 8.
    run_level(port, [payload], concurrency=8 * workers, requests=16 * workers, max_seconds=120)


def stop_server(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


# --- load -----------------------------------------------------------------------------------


def run_level(port: int, payloads: list, concurrency: int, requests: int, max_seconds: float) -> dict:
    """``requests`` requests from ``concurrency`` client threads (new connection each), time-capped."""
    counter = itertools.count()
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start = time.perf_counter()
    stop_at = start + max_seconds

    def client() -> None:
        while True:
            index = next(counter)
            if index >= requests or time.perf_counter() > stop_at:
                return
            began = time.perf_counter()
            ok = post(port, payloads[index % len(payloads)])
            took = time.perf_counter() - began
            with lock:
                latencies.append(took)
                if not ok:
                    errors[0] += 1

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "capped": len(latencies) < requests,
        "seconds": round(wall, 2),
        "rps": round(len(latencies) / wall, 2),
        "p50_ms": round(cuts[49] * 1000, 1),
        "p95_ms": round(cuts[94] * 1000, 1),
        "p99_ms": round(cuts[98] * 1000, 1),
        "errors": errors[0],
    }


@torch.inference_mode()
def forward_loop(checkpoint: Path, batch: int, min_seconds: float, threads: int) -> float:
    """Images/s of the bare model on ready-made tensors at ``batch`` with ``threads`` threads."""
    from cnnkit.models.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build_model("cpu")
    size = ckpt.preprocess.image_size
    x = torch.randn(batch, 3, size, size)
    for _ in range(2):
        model(x)
    # The best rate over windows of >= 1 s: on a shared machine the least-disturbed window is the
    # closest to what the hardware can do (and a higher limit only makes the ratios stricter).
    best, start = 0.0, time.perf_counter()
    while True:
        images, began = 0, time.perf_counter()
        while time.perf_counter() - began < 1.0 or images < 2 * batch:
            model(x)
            images += batch
        best = max(best, images / (time.perf_counter() - began))
        if time.perf_counter() - start >= min_seconds:
            return best


def forward_limit(checkpoint: Path, batch: int, min_seconds: float) -> dict[str, float]:
    """The machine's forward-only images/s at ``batch``, all cores used two ways, each in fresh
    processes: one process with a thread per core, and a single-thread process per core (summed).
    The limit is the better of the two: no server can beat it."""
    def run(processes: int, threads: int) -> float:
        command = [sys.executable, __file__, "--forward", str(checkpoint), str(batch), str(min_seconds), str(threads)]
        children = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
        return sum(float(child.communicate()[0].strip().splitlines()[-1]) for child in children)

    one_process = run(1, cores())
    per_core = run(cores(), 1) if cores() > 1 else one_process
    return {"limit": round(max(one_process, per_core), 2), "one_process": round(one_process, 2),
            "process_per_core": round(per_core, 2)}


# --- main -----------------------------------------------------------------------------------


def bench_arch(arch: str, args: argparse.Namespace, work: Path, payloads: list) -> dict:
    checkpoint = work / f"{arch}.pt"
    make_checkpoint(arch, checkpoint)
    servers: dict[str, list[dict]] = {}
    for kind in args.servers:
        port = free_port()
        log = work / f"{arch}-{kind}.log"
        process = start_server(kind, checkpoint, port, log)
        workers = 2 if kind.endswith("w2") else 1
        print(f"[{arch}] {kind} on port {port}", file=sys.stderr, flush=True)
        try:
            wait_ready(port, process, payloads[0], workers)
            levels = []
            # The collapsing baseline only where the issue measured it: it would take minutes per level.
            for concurrency in [8] if kind == "naive-gunicorn-w2" else args.concurrency:
                before = batch_metrics(port) if kind.startswith("cnnkit") else None
                row = run_level(port, payloads, concurrency, args.requests, args.max_seconds)
                if before is not None:
                    images, passes = (a - b for a, b in zip(batch_metrics(port), before))
                    row["mean_batch"] = round(images / passes, 2) if passes else None
                levels.append(row)
                print(f"[{arch}] {kind} c={concurrency}: {row}", file=sys.stderr, flush=True)
            servers[kind] = levels
        finally:
            stop_server(process)
    # The limit, with no server running: at 1 and at every mean batch size cnnkit reached.
    sizes = {1} | {max(1, round(row["mean_batch"])) for rows in servers.values() for row in rows if row.get("mean_batch")}
    limits, detail = {}, {}
    for size in sorted(sizes):
        detail[size] = forward_limit(checkpoint, size, args.limit_seconds)
        limits[size] = detail[size]["limit"]
        print(f"[{arch}] forward-only at batch {size}: {detail[size]} img/s", file=sys.stderr, flush=True)
    # Each level is compared with the limit at the batch size its forward passes had: the mean
    # cnnkit reached (from its /metrics), 1 for the naive servers (one image per pass).
    for rows in servers.values():
        for row in rows:
            row["limit_batch"] = max(1, round(row.get("mean_batch") or 1))
            row["limit_ips"] = limits[row["limit_batch"]]
            row["ratio"] = round(row["rps"] / row["limit_ips"], 2)
    return {"servers": servers, "limits": limits, "limit_detail": detail}


def markdown(results: dict) -> str:
    out = []
    for arch, result in results["archs"].items():
        out.append(f"**{arch}** — forward-only img/s by batch size, one process x {results['machine']['cores']} "
                   "threads / one 1-thread process per core (limit = the better): "
                   + ", ".join(f"{b}: {d['one_process']} / {d['process_per_core']}" for b, d in result["limit_detail"].items())
                   + "\n")
        out.append("| server | conc. | requests | req/s | p50 ms | p95 ms | p99 ms | errors | mean batch | limit (batch) | ratio |")
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for kind, rows in result["servers"].items():
            for row in rows:
                capped = " (capped)" if row["capped"] else ""
                out.append(
                    f"| {kind} | {row['concurrency']} | {row['requests']}{capped} | {row['rps']} | {row['p50_ms']} | "
                    f"{row['p95_ms']} | {row['p99_ms']} | {row['errors']} | {row.get('mean_batch') or '-'} | "
                    f"{row['limit_ips']} ({row['limit_batch']}) | {row['ratio']} |"
                )
        out.append("")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--forward":  # one forward-only measurement (a child)
        print(forward_loop(Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "densenet121"])
    parser.add_argument("--servers", nargs="+", default=["cnnkit-w1", "cnnkit-w2", "naive", "naive-gunicorn-w2"],
                        choices=["cnnkit-w1", "cnnkit-w2", "cnnkit-onnx-w2", "naive", "naive-gunicorn-w2"],
                        help="cnnkit-onnx-w2 (not run by default) serves the ONNX export with onnxruntime")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrency level")
    parser.add_argument("--max-seconds", type=float, default=30, help="cap per level (a collapsed server)")
    parser.add_argument("--limit-seconds", type=float, default=3, help="time per forward-only measurement")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "out" / "serve_load.json"))
    args = parser.parse_args()

    started = time.time()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    payloads = make_payloads(16)
    results: dict = {
        "command": "python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]]),
        "machine": {"cores": cores(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_avg_1m_before": load_before},
        "archs": {},
    }
    with tempfile.TemporaryDirectory(prefix="cnnkit-serve-bench-") as tmp:
        for arch in args.archs:
            results["archs"][arch] = bench_arch(arch, args, Path(tmp), payloads)
    results["machine"]["load_avg_1m_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results["seconds"] = round(time.time() - started, 1)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"`{results['command']}` — {results['seconds']} s, {cores()} cores, "
          f"load average {load_before} before / {results['machine']['load_avg_1m_after']} after\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
