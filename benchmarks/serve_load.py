"""Load benchmark for ``cnnkit serve`` (issues 5 and 17), against 127.0.0.1 only.

For each architecture, in one run on one machine:

1. ``cnnkit serve`` with ``--workers 1`` and ``--workers 2`` (defaults otherwise; optionally the
   ONNX export served with onnxruntime, ``--servers ... cnnkit-onnx-w2``, or its int8 export,
   ``cnnkit-int8-w2``, or the OpenVINO IR, ``cnnkit-openvino-w2``, or its int8 IR,
   ``cnnkit-openvino-int8-w2``: each compared with the torch checkpoint at the same concurrency,
   the int8 ones against the issue 13 target at concurrency 8), the naive
   tutorial-style server (``naive_server.py``: Flask's threaded server, one image per forward
   pass) and the same naive app under gunicorn with 2 sync workers; with ``--accept-delay-ms``,
   each cnnkit server once per value of ``CNNKIT_ACCEPT_DELAY_MS`` (0: first-come accept);
2. for each, bounded load at each concurrency, ``--repeats`` times: single-image POST /predict
   requests (multipart, real JPEGs of ../shared/data/flowers-20 as they are on disk), each on a
   new connection, each level capped at ``--max-seconds``; requests/s, p50/p95/p99 latency,
   errors, and for cnnkit the mean batch size of its forward passes (from its /metrics);
3. the limit (``limit.py``), measured while no server runs: forward-only images/s through
   ``Predictor``'s numeric path in the best layout, the best batch size up to ``--max-batch``
   (16, cnnkit serve's default) and the better of one process x 2 threads and two 1-thread
   processes (what ``--workers 1`` and ``--workers 2`` run).

Every ratio, the verdicts at concurrency 8 and the accept-delay comparison are computed here and
printed as Markdown tables (for benchmarks/RESULTS.md); the raw runs go to benchmarks/out/serve_load.json.
Weights are random (``weights none``): throughput does not depend on their values.

    python benchmarks/serve_load.py      # --archs resnet18 densenet121 --requests 96 --concurrency 1 8 32 --repeats 3
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import shlex
import shutil
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
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from limit import REPO, finish, machine, make_checkpoint, measure_limit, real_images, subprocess_env, summary  # noqa: E402

HOST = "127.0.0.1"
SERVERS = ["cnnkit-w1", "cnnkit-w2", "cnnkit-onnx-w2", "cnnkit-int8-w1", "cnnkit-int8-w2", "cnnkit-openvino-w2",
           "cnnkit-openvino-int8-w1", "cnnkit-openvino-int8-w2", "naive", "naive-gunicorn-w2"]
# What a cnnkit server kind serves: "cnnkit-BACKEND-wN" -> (cnnkit export --format, --int8); "cnnkit-wN": the checkpoint.
BACKENDS = {"onnx": ("onnx", False), "int8": ("onnx", True), "openvino": ("openvino", False),
            "openvino-int8": ("openvino", True)}
INT8_TARGET = 1.8  # issue 13: an int8 server's req/s at concurrency 8 / the torch server's, p95 lower


def cnnkit_kind(kind: str) -> tuple[str | None, int]:
    """``cnnkit-openvino-int8-w2`` -> ("openvino-int8", 2); ``cnnkit-w2`` -> (None, 2)."""
    name, workers = kind.rsplit("-w", 1)
    return name.removeprefix("cnnkit").removeprefix("-") or None, int(workers)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def make_payloads(count: int) -> list[tuple[bytes, str]]:
    """Multipart bodies, each one real JPEG of flowers-20 as it is on disk (test/ first)."""
    bodies = []
    for src in real_images(count):
        boundary = uuid.uuid4().hex
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{src.name}"\r\n'
                "Content-Type: image/jpeg\r\n\r\n").encode() + src.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
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


def batch_metrics(port: int) -> tuple[float, float]:
    """(images, forward passes) so far, from a cnnkit server's /metrics."""
    from cnnkit.serve import iter_metric_samples

    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        body = connection.getresponse().read()
    finally:
        connection.close()
    values = {name: value for name, labels, value in iter_metric_samples(body.decode()) if not labels}
    return values.get("cnnkit_batch_size_sum", 0.0), values.get("cnnkit_batch_size_count", 0.0)


# --- servers --------------------------------------------------------------------------------


def start_server(kind: str, checkpoint: Path, port: int, log: Path, accept_delay_ms: str | None,
                 int8_flags: Sequence[str] = ()) -> subprocess.Popen:
    env = subprocess_env(CKPT=str(checkpoint), PYTHONUNBUFFERED="1")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("CNNKIT_ACCEPT_DELAY_MS", None)
    if accept_delay_ms is not None:
        env["CNNKIT_ACCEPT_DELAY_MS"] = accept_delay_ms
    if kind.startswith("cnnkit"):
        backend, workers = cnnkit_kind(kind)
        model = export_model(checkpoint, backend, env, int8_flags)
        # No shedding (the server before issue 16): this benchmark needs every request answered;
        # benchmarks/serve_ops.py measures overload.
        args = [sys.executable, "-m", "cnnkit", "serve", str(model), "--port", str(port),
                "--workers", str(workers), "--device", "cpu", "--threads", "16", "--max-queue", "100000"]
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


def export_model(checkpoint: Path, backend: str | None, env: dict[str, str], int8_flags: Sequence[str] = ()) -> Path:
    """The model file a cnnkit server kind serves (:data:`BACKENDS`): the checkpoint, its ONNX
    export or OpenVINO IR, or their int8 versions (calibrated on 128 photos of flowers-20 that the
    load does not send; the weights are random, so the accuracy half of the gate means nothing
    here and --ignore-gate keeps the model whatever it says: this benchmark measures serving speed;
    ``int8_flags``: more flags for an int8 export)."""
    from cnnkit.export import default_output

    if backend is None:
        return checkpoint
    fmt, int8 = BACKENDS[backend]
    model = Path(default_output(str(checkpoint), fmt, int8))
    if model.exists():
        return model
    flags = ["--format", fmt]
    if int8:
        calibration = checkpoint.parent / "calibration"
        calibration.mkdir(exist_ok=True)
        for src in real_images()[-128:]:  # valid/'s last; the payloads are test/'s first
            shutil.copyfile(src, calibration / f"{src.parent.name}_{src.name}")
        flags += ["--int8", "--calibration-data", str(calibration), "--ignore-gate", *int8_flags]
    subprocess.run([sys.executable, "-m", "cnnkit", "-q", "export", str(checkpoint), "-o", str(model), *flags],
                   check=True, stdout=subprocess.DEVNULL, env=env)
    return model


def wait_ready(port: int, process: subprocess.Popen, payload, workers: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not post(port, payload, timeout=30):
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError("server not ready in time")
        time.sleep(0.2)
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
    return {"concurrency": concurrency, "requests": len(latencies), "capped": len(latencies) < requests,
            "seconds": round(wall, 2), "rps": round(len(latencies) / wall, 2), "p50_ms": round(cuts[49] * 1000, 1),
            "p95_ms": round(cuts[94] * 1000, 1), "p99_ms": round(cuts[98] * 1000, 1), "errors": errors[0]}


def bench_server(kind: str, delay: str | None, args, checkpoint: Path, work: Path, payloads: list) -> dict[int, list[dict]]:
    """``--repeats`` runs of every concurrency level against one server instance."""
    port = free_port()
    process = start_server(kind, checkpoint, port, work / f"{checkpoint.stem}-{kind}-{delay}.log", delay,
                           args.openvino_int8_flags if "openvino-int8" in kind else [])
    workers = 2 if kind.endswith("w2") else 1
    try:
        wait_ready(port, process, payloads[0], workers)
        levels: dict[int, list[dict]] = {}
        # The collapsing baseline only where the issue measured it: it would take minutes per level.
        for concurrency in [8] if kind == "naive-gunicorn-w2" else args.concurrency:
            runs = levels.setdefault(concurrency, [])
            for _ in range(args.repeats):
                before = batch_metrics(port) if kind.startswith("cnnkit") else None
                row = run_level(port, payloads, concurrency, args.requests, args.max_seconds)
                if before is not None:
                    images, passes = (a - b for a, b in zip(batch_metrics(port), before))
                    row["mean_batch"] = round(images / passes, 2) if passes else None
                runs.append(row)
                print(f"[{checkpoint.stem}] {kind} delay={delay} c={concurrency}: {row}", file=sys.stderr, flush=True)
        return levels
    finally:
        stop_server(process)


def summarise(runs: list[dict], limit: float) -> dict:
    pick = lambda key: [r[key] for r in runs if r.get(key) is not None]  # noqa: E731
    return {"concurrency": runs[0]["concurrency"], "requests": pick("requests"), "capped": any(pick("capped")),
            "rps": summary(pick("rps")), "p50_ms": summary(pick("p50_ms")), "p95_ms": summary(pick("p95_ms")),
            "p99_ms": summary(pick("p99_ms")), "errors": sum(pick("errors")),
            "mean_batch": summary(pick("mean_batch")) if pick("mean_batch") else None,
            "ratio": summary([r / limit for r in pick("rps")])}


def bench_arch(arch: str, args, work: Path, payloads: list) -> dict:
    checkpoint = make_checkpoint(arch, work / f"{arch}.pt", classes=5)
    servers: dict[str, dict[int, list[dict]]] = {}
    for kind in args.servers:
        delays = args.accept_delay_ms if kind.startswith("cnnkit") and args.accept_delay_ms else [None]
        for delay in delays:
            name = kind if delay is None else f"{kind}, accept delay {delay} ms"
            servers[name] = bench_server(kind, delay, args, checkpoint, work, payloads)
    print(f"[{arch}] limit (no server running)", file=sys.stderr, flush=True)
    sizes = [b for b in (1, 2, 4, 8, 16, 32) if b <= args.max_batch]
    limit = measure_limit(checkpoint, sizes, ["1x2", "2x1"], args.limit_batches, args.limit_seconds)
    rows = {name: {c: summarise(runs, limit.img_s) for c, runs in levels.items()} for name, levels in servers.items()}
    return {"limit": limit.to_dict(), "limit_text": limit.describe(), "grid": limit.grid(), "rows": rows, "raw": servers}


# --- tables ---------------------------------------------------------------------------------


def fmt(s: dict | None, digits: int = 1) -> str:
    if s is None:
        return "-"
    if s["n"] == 1 or s["min"] == s["max"]:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def markdown(results: dict) -> str:
    out = []
    for arch, r in results["archs"].items():
        out += [f"**{arch}**: the limit is {r['limit_text']}; forward-only img/s of each cell:", "", r["grid"], "",
                "| server | conc. | requests per run | req/s | p50 ms | p95 ms | p99 ms | errors | mean batch | "
                "ratio to the limit |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, levels in r["rows"].items():
            for c, row in levels.items():
                capped = f"{min(row['requests'])}–{max(row['requests'])} (capped)" if row["capped"] else str(max(row["requests"]))
                out.append(f"| {name} | {c} | {capped} | {fmt(row['rps'], 2)} | {row['p50_ms']['median']:.1f} | "
                           f"{fmt(row['p95_ms'])} | {row['p99_ms']['median']:.1f} | {row['errors']} | "
                           f"{fmt(row['mean_batch'], 2)} | {fmt(row['ratio'], 2)} |")
        out.append("")
    verdicts = verdict_table(results)
    if verdicts:
        out += verdicts + [""]
    out += delay_table(results)
    backends = backend_table(results)
    if backends:
        out += [""] + backends
    return "\n".join(out)


def backend_table(results: dict) -> list[str]:
    """The exported models' servers (ONNX Runtime, OpenVINO; float, int8) against the torch
    checkpoint's, same workers and load; an int8 server at concurrency 8 against issue 13's target."""
    lines = []
    for arch, r in results["archs"].items():
        for name, levels in r["rows"].items():
            kind, sep, delay = name.partition(", ")
            if not kind.startswith("cnnkit"):
                continue
            backend, workers = cnnkit_kind(kind)
            base_name = f"cnnkit-w{workers}{sep}{delay}"
            if backend is None or base_name not in r["rows"]:
                continue
            if not lines:
                lines = ["| arch, server vs torch | conc. | req/s | ratio | p95 ms | errors | "
                         f"int8 target (conc. 8: ≥ {INT8_TARGET:g}×, p95 lower) |",
                         "| --- | ---: | --- | ---: | --- | ---: | --- |"]
            for c, row in levels.items():
                base = r["rows"][base_name].get(c)
                if base is None:
                    continue
                ratio = row["rps"]["median"] / base["rps"]["median"]
                target = "-"
                if BACKENDS[backend][1] and c == 8:
                    met = ratio >= INT8_TARGET and row["p95_ms"]["median"] < base["p95_ms"]["median"]
                    target = "met" if met else "missed"
                lines.append(f"| {arch}, {name} vs {base_name} | {c} | {fmt(base['rps'], 2)} → {fmt(row['rps'], 2)} | "
                             f"**{ratio:.2f}×** | {fmt(base['p95_ms'])} → {fmt(row['p95_ms'])} | {row['errors']} | "
                             f"{target} |")
    return lines


def verdict_table(results: dict) -> list[str]:
    """The targets at concurrency 8, for the default server (--workers = one per core, here 2)."""
    lines = []
    for arch, r in results["archs"].items():
        rows = {name: levels.get(8) for name, levels in r["rows"].items()}
        cnnkit, naive, collapse = rows.get("cnnkit-w2"), rows.get("naive"), rows.get("naive-gunicorn-w2")
        if cnnkit is None:
            continue
        if not lines:
            lines = ["| arch (concurrency 8) | req/s / limit (target ≥ 0.85×) | p95 vs naive server (target: below) | "
                     "errors | cnnkit-w2 vs naive under gunicorn -w 2 |", "| --- | --- | --- | ---: | --- |"]
        ratio = cnnkit["rps"]["median"] / r["limit"]["img_s"]
        verdict = "met" if ratio >= 0.85 else f"missed by {(0.85 - ratio) / 0.85:.0%}"
        p95 = "-" if naive is None else (
            f"{cnnkit['p95_ms']['median']:.0f} vs {naive['p95_ms']['median']:.0f} ms: "
            f"{'below' if cnnkit['p95_ms']['median'] < naive['p95_ms']['median'] else 'NOT below'} "
            f"({cnnkit['p95_ms']['median'] / naive['p95_ms']['median']:.2f}×)")
        versus = "-" if collapse is None else (
            f"{cnnkit['rps']['median'] / collapse['rps']['median']:.0f}× the req/s "
            f"({collapse['rps']['median']:.2f} req/s, p95 {collapse['p95_ms']['median'] / 1000:.1f} s)")
        lines.append(f"| {arch} | {cnnkit['rps']['median']:.2f} / {r['limit']['img_s']:.2f} = **{ratio:.2f}×** "
                     f"({verdict}) | {p95} | {cnnkit['errors']} | {versus} |")
    return lines


def delay_table(results: dict) -> list[str]:
    """Load-aware accept against first-come accept (CNNKIT_ACCEPT_DELAY_MS=0), same run."""
    lines = []
    for arch, r in results["archs"].items():
        for name, off in r["rows"].items():
            kind, _, delay = name.partition(", accept delay ")
            if delay != "0 ms":
                continue
            for other, on in r["rows"].items():
                if not other.startswith(f"{kind}, accept delay ") or other == name:
                    continue
                if not lines:
                    lines = ["| arch, server, conc. | accept delay | p95 ms: first come → load-aware | change | "
                             "p99 ms | req/s |", "| --- | --- | --- | ---: | --- | --- |"]
                for c in on:
                    a, b = off[c], on[c]
                    change = b["p95_ms"]["median"] / a["p95_ms"]["median"] - 1
                    lines.append(f"| {arch}, {kind}, {c} | 0 → {other.rsplit(' ', 2)[1]} ms | {fmt(a['p95_ms'])} → "
                                 f"{fmt(b['p95_ms'])} | {change:+.0%} | {a['p99_ms']['median']:.0f} → "
                                 f"{b['p99_ms']['median']:.0f} | {fmt(a['rps'], 2)} → {fmt(b['rps'], 2)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "densenet121"])
    parser.add_argument("--servers", nargs="+", default=["cnnkit-w1", "cnnkit-w2", "naive", "naive-gunicorn-w2"],
                        choices=SERVERS, help="cnnkit-onnx-w2 and cnnkit-int8-w* (not run by default) serve the "
                        "float and the int8 ONNX export, cnnkit-openvino-w2 and cnnkit-openvino-int8-w* the float and "
                        "the int8 OpenVINO IR")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=96, help="requests per run of a level")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each level (medians, min–max)")
    parser.add_argument("--max-seconds", type=float, default=30, help="cap per run of a level (a collapsed server)")
    parser.add_argument("--accept-delay-ms", nargs="+", default=None,
                        help="run each cnnkit server once per CNNKIT_ACCEPT_DELAY_MS value (e.g. 0 1)")
    parser.add_argument("--max-batch", type=int, default=16, help="the largest batch size of the limit (serve's default)")
    parser.add_argument("--limit-batches", type=int, default=8)
    parser.add_argument("--limit-seconds", type=float, default=3.0)
    parser.add_argument("--openvino-int8-flags", type=shlex.split, default=[], metavar="FLAGS",
                        help="more cnnkit export flags for the int8 IRs, as one string: "
                        "--openvino-int8-flags='--smooth-quant 0.5'")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "out" / "serve_load.json")
    args = parser.parse_args()

    started = time.time()
    payloads = make_payloads(64)
    results: dict = {"command": "python benchmarks/serve_load.py " + shlex.join(sys.argv[1:]),
                     "machine_before": machine(), "archs": {}}
    print(json.dumps(results["machine_before"]), file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="cnnkit-serve-bench-") as tmp:
        for arch in args.archs:
            results["archs"][arch] = bench_arch(arch, args, Path(tmp), payloads)
    finish(results, started, args.output, markdown(results))


if __name__ == "__main__":
    main()
