"""Operations benchmark for ``cnnkit serve`` (issue 16), against 127.0.0.1 only, resnet18 at 224 px
(random weights: speed does not depend on their values), 2 workers, single-image POST /predict of
real flowers-20 JPEGs, each on a new connection.

1. **Overload**: for each server (``no-shed``: ``--max-queue 100000 --threads 16``, the server and
   its defaults as they were, every request waits its turn; ``shed``: the defaults, a bound measured at warm-up from
   ``--queue-target-ms 500``), ``--repeats`` runs of ``--seconds`` at concurrency 8 and 64, in
   turn. Clients are closed-loop and well-behaved: a 503 with ``Retry-After`` is retried after
   that many seconds (what a load balancer or client library does). Reported: requests/s of the
   200s, p50/p95/p99 of the 200s, the shed requests' p50/p99, 5xx other than 503, connection
   errors; ratios to the same server's concurrency-8 run.
2. **Reload under load**: concurrency 8 for ``--reload-seconds`` (60), ``POST /admin/reload``
   every 10 s alternating two checkpoints (A and B, different weights): failed requests, the
   model versions answered, the workers' summed RSS after the first reload and after the last.
3. **Shadow on and off**: two servers, the defaults and ``--shadow B`` (B: other weights), both
   up (started one after the other) and measured in turn, the first of each round alternating,
   ``--repeats`` runs of ``--seconds`` at concurrency 8 each:
   requests/s of the 200s and their p95, the ratios on/off of each pair of runs, and the shadow's
   images scored and dropped.

Medians of the repeats with their range; printed as Markdown (benchmarks/RESULTS.md); raw runs in
benchmarks/out/serve_ops.json.

    python benchmarks/serve_ops.py      # --repeats 3 --seconds 20 --reload-seconds 60
    python benchmarks/serve_ops.py --parts shadow --repeats 5      # one part only
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from limit import REPO, finish, machine, make_checkpoint, subprocess_env, summary  # noqa: E402
from serve_load import HOST, free_port, make_payloads, stop_server  # noqa: E402

KEY = "bench-" + "0123456789abcdef" * 2
AUTH = {"Authorization": f"Bearer {KEY}"}
SERVERS = {"no-shed": ["--max-queue", "100000", "--threads", "16"], "shed": []}  # no-shed: the defaults before


def request(port: int, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
            timeout: float = 120) -> tuple[int | None, dict, bytes]:
    """(status or None for a connection error, headers, body)."""
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = dict(AUTH, **({"Content-Type": content_type} if content_type else {}))
        connection.request(method, path, body, headers)
        answer = connection.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    except OSError:
        return None, {}, b""
    finally:
        connection.close()


def start(checkpoint: Path, port: int, log: Path, flags: list[str]) -> subprocess.Popen:
    env = subprocess_env(PYTHONUNBUFFERED="1")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    keys = log.parent / "keys.txt"
    keys.write_text(f"bench {KEY}\n")
    keys.chmod(0o600)
    args = [sys.executable, "-m", "cnnkit", "serve", str(checkpoint), "--port", str(port), "--workers", "2",
            "--device", "cpu", "--api-key-file", str(keys), *flags]
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_ready(port: int, process: subprocess.Popen, payload: tuple[bytes, str]) -> None:
    deadline = time.monotonic() + 180
    while request(port, "POST", "/predict", *payload)[0] != 200:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server not ready (exit status {process.poll()})")
        time.sleep(0.2)
    run(port, [payload], 16, 5.0)  # every worker warmed up


def cuts(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return (float("nan"),) * 3
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=100, method="inclusive")
    return q[49], q[94], q[98]


def run(port: int, payloads: list, concurrency: int, seconds: float) -> dict:
    """Closed-loop clients for ``seconds``; 503s are retried after their Retry-After."""
    ok: list[float] = []
    shed: list[float] = []
    other_5xx, connection_errors, client_errors = [0], [0], [0]
    lock = threading.Lock()
    start_at = time.perf_counter()
    stop_at = start_at + seconds

    def client(index: int) -> None:
        n = index
        while time.perf_counter() < stop_at:
            began = time.perf_counter()
            status, headers, _ = request(port, "POST", "/predict", *payloads[n % len(payloads)])
            took = time.perf_counter() - began
            n += concurrency
            with lock:
                if status == 200:
                    ok.append(took)
                elif status == 503 and "retry-after" in headers:
                    shed.append(took)
                elif status is None:
                    connection_errors[0] += 1
                elif status >= 500:
                    other_5xx[0] += 1
                else:
                    client_errors[0] += 1
            if status == 503 and "retry-after" in headers:
                time.sleep(min(float(headers["retry-after"]), max(0.0, stop_at - time.perf_counter())))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start_at
    p50, p95, p99 = cuts(ok)
    s50, _, s99 = cuts(shed)
    return {"concurrency": concurrency, "seconds": round(wall, 2), "ok": len(ok), "ok_rps": round(len(ok) / wall, 2),
            "p50_ms": round(p50 * 1000, 1), "p95_ms": round(p95 * 1000, 1), "p99_ms": round(p99 * 1000, 1),
            "shed": len(shed), "shed_p50_ms": round(s50 * 1000, 1), "shed_p99_ms": round(s99 * 1000, 1),
            "other_5xx": other_5xx[0], "connection_errors": connection_errors[0], "4xx": client_errors[0]}


def overload(args, checkpoint: Path, work: Path, payloads: list) -> dict:
    results: dict = {}
    for name, flags in SERVERS.items():
        port = free_port()
        process = start(checkpoint, port, work / f"{name}.log", flags)
        try:
            wait_ready(port, process, payloads[0])
            runs = results.setdefault(name, {"8": [], "64": []})
            log = work / f"{name}.log"
            for _ in range(args.repeats):
                for concurrency in (8, 64):
                    offset = log.stat().st_size
                    row = run(port, payloads, concurrency, args.seconds)
                    row["shed_app_p50_ms"], _, row["shed_app_p99_ms"] = cuts(shed_times(log, offset))
                    runs[str(concurrency)].append(row)
                    print(f"[overload] {name} c={concurrency}: {row}", file=sys.stderr, flush=True)
        finally:
            stop_server(process)
    return results


def shed_times(log: Path, offset: int) -> list[float]:
    """The server's own time (its request log's ``ms``) for each 503 logged after ``offset``."""
    with open(log, "rb") as handle:
        handle.seek(offset)
        lines = handle.read().decode(errors="replace").splitlines()
    times = []
    for line in lines:
        if line.startswith("{") and '"status": 503' in line:
            try:
                times.append(json.loads(line)["ms"])
            except (ValueError, KeyError):
                pass
    return times


def worker_rss_kib(master: int) -> int:
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != master:
                continue
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return total


def reload_under_load(args, checkpoints: list[Path], work: Path, payloads: list) -> dict:
    port = free_port()
    process = start(checkpoints[0], port, work / "reload.log", [])
    answers: list[tuple[int | None, str | None]] = []
    stopping = threading.Event()

    def client(index: int) -> None:
        n = index
        while not stopping.is_set():
            status, _, body = request(port, "POST", "/predict", *payloads[n % len(payloads)])
            n += 8
            answers.append((status, json.loads(body)["model_version"] if status == 200 else None))

    reloads, rss = [], []
    try:
        wait_ready(port, process, payloads[0])
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        began = time.monotonic()
        for i in range(int(args.reload_seconds // 10)):
            time.sleep(max(0.0, began + 10 * (i + 1) - 5 - time.monotonic()))  # reloads at 5, 15, 25 ... s
            target = checkpoints[(i + 1) % 2]
            t0 = time.perf_counter()
            status, _, body = request(port, "POST", "/admin/reload", json.dumps({"checkpoint": str(target)}).encode(),
                                      "application/json")
            reloads.append({"status": status, "ms": round((time.perf_counter() - t0) * 1000, 1),
                            "answer": json.loads(body) if body else None})
            time.sleep(2)  # every worker has swapped (SIGHUP to the others)
            rss.append(worker_rss_kib(process.pid))
            print(f"[reload] {i + 1}: {reloads[-1]['status']} in {reloads[-1]['ms']} ms, RSS {rss[-1]} KiB",
                  file=sys.stderr, flush=True)
        time.sleep(max(0.0, began + args.reload_seconds - time.monotonic()))
        stopping.set()
        for thread in threads:
            thread.join()
    finally:
        stopping.set()
        stop_server(process)
    from cnnkit.models.exported import model_version

    versions = {model_version(path) for path in checkpoints}
    answered = [version for status, version in answers if status == 200]
    return {"requests": len(answers), "failed": sum(status != 200 for status, _ in answers),
            "versions_seen": sorted(set(answered)), "all_versions_known": set(answered) <= versions,
            "per_version": {v: answered.count(v) for v in sorted(versions)}, "reloads": reloads, "rss_kib": rss}


def shadow_on_off(args, checkpoints: list[Path], work: Path, payloads: list) -> dict:
    servers = {"off": [], "on": ["--shadow", str(checkpoints[1])]}
    ports = {name: free_port() for name in servers}
    processes: dict = {}
    runs: dict = {name: [] for name in servers}
    try:
        for name, flags in servers.items():  # one at a time: each measures its forward-pass rate (its
            # --max-queue bound) at warm-up, which the other's warm-up would slow
            processes[name] = start(checkpoints[0], ports[name], work / f"shadow-{name}.log", flags)
            wait_ready(ports[name], processes[name], payloads[0])
        for round_ in range(args.repeats):
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))  # (which goes first alternates)
            for name in order:  # in turn: the idle one uses no CPU
                row = run(ports[name], payloads, 8, args.seconds)
                runs[name].append(row)
                print(f"[shadow] {name}: {row}", file=sys.stderr, flush=True)
        status, _, body = request(ports["on"], "GET", "/metrics")
        from cnnkit.serve import iter_metric_samples

        counts = {labels["result"]: value for name, labels, value in iter_metric_samples(body.decode())
                  if name == "cnnkit_shadow_images_total"}
        agreed = sum(value for name, _, value in iter_metric_samples(body.decode()) if name == "cnnkit_shadow_agreement_total")
    finally:
        for process in processes.values():
            stop_server(process)
    return {"runs": runs, "shadow_images": counts, "shadow_agreed": agreed}


def markdown(results: dict) -> str:
    if "overload" not in results:
        return shadow_markdown(results["shadow"])
    lines = ["| server | concurrency | 200s/s | p50 ms | p95 ms | p99 ms | shed | shed p50 / p99 ms (in the server) | other 5xx | "
             "conn. errors |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    med = lambda runs, key: summary([r[key] for r in runs])  # noqa: E731
    fmt = lambda s, d=1: f"{s['median']:.{d}f} ({s['min']:.{d}f}–{s['max']:.{d}f})"  # noqa: E731
    for name, levels in results["overload"].items():
        for c, runs in levels.items():
            shed = med(runs, "shed")
            shed_ms = (f"{med(runs, 'shed_p50_ms')['median']:.1f} / {med(runs, 'shed_p99_ms')['median']:.1f} "
                       f"({med(runs, 'shed_app_p50_ms')['median']:.1f} / {med(runs, 'shed_app_p99_ms')['median']:.1f})"
                       if shed["max"] else "–")
            lines.append(f"| {name} | {c} | {fmt(med(runs, 'ok_rps'))} | {fmt(med(runs, 'p50_ms'), 0)} | "
                         f"{fmt(med(runs, 'p95_ms'), 0)} | {fmt(med(runs, 'p99_ms'), 0)} | {shed['median']:.0f} | {shed_ms} | "
                         f"{sum(r['other_5xx'] for r in runs)} | {sum(r['connection_errors'] for r in runs)} |")
    lines += ["", "| server | p99 at 64 / p99 at 8 (target ≤ 3) | 200s/s at 64 / at 8 (target ≥ 0.9) |", "| --- | --- | --- |"]
    for name, levels in results["overload"].items():
        p99 = statistics.median(a["p99_ms"] / b["p99_ms"] for a, b in zip(levels["64"], levels["8"]))
        rps = statistics.median(a["ok_rps"] / b["ok_rps"] for a, b in zip(levels["64"], levels["8"]))
        lines.append(f"| {name} | {p99:.2f} | {rps:.2f} |")
    r = results["reload"]
    rss = r["rss_kib"]
    growth = f"{rss[-1] / rss[0]:.3f}" if len(rss) > 1 else "–"
    lines += ["", "| reload under load | value |", "| --- | --- |",
              f"| requests / failed | {r['requests']} / {r['failed']} |",
              f"| reloads (status) | {', '.join(str(x['status']) for x in r['reloads'])} |",
              f"| reload answer time, median ms | {statistics.median(x['ms'] for x in r['reloads']):.0f} |",
              f"| versions answered | {len(r['versions_seen'])}, all of A or B: {r['all_versions_known']} ({r['per_version']}) |",
              f"| workers' RSS after reload 1 → {len(rss)} | {rss[0] / 1024:.0f} → {rss[-1] / 1024:.0f} MiB (ratio {growth}) |"]
    if "shadow" in results:
        lines += ["", shadow_markdown(results["shadow"])]
    return "\n".join(lines)


def shadow_markdown(shadow: dict) -> str:
    off, on = shadow["runs"]["off"], shadow["runs"]["on"]
    fmt = lambda values, d=1: (lambda s: f"{s['median']:.{d}f} ({s['min']:.{d}f}–{s['max']:.{d}f})")(summary(values))  # noqa: E731
    images = shadow["shadow_images"]
    lines = ["| concurrency 8 | 200s/s | p95 ms | other 5xx | conn. errors |", "| --- | --- | --- | --- | --- |"]
    for name, runs in (("shadow off", off), ("shadow on", on)):
        lines.append(f"| {name} | {fmt([r['ok_rps'] for r in runs])} | {fmt([r['p95_ms'] for r in runs], 0)} | "
                     f"{sum(r['other_5xx'] for r in runs)} | {sum(r['connection_errors'] for r in runs)} |")
    lines += ["", "| on / off, same round | median (range) | target |", "| --- | --- | --- |",
              f"| 200s/s | {fmt([a['ok_rps'] / b['ok_rps'] for a, b in zip(on, off)], 3)} | ≥ 0.9 |",
              f"| p95 | {fmt([a['p95_ms'] / b['p95_ms'] for a, b in zip(on, off)], 3)} | ≤ 1.15 |",
              "", f"Shadow images: {images.get('scored', 0):.0f} scored, {images.get('dropped', 0):.0f} dropped, "
              f"{images.get('failed', 0):.0f} failed (of {sum(r['ok'] for r in on)} answered); agreement with the "
              f"primary {shadow['shadow_agreed'] / max(images.get('scored', 0), 1):.3f}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0, help="each overload run")
    parser.add_argument("--reload-seconds", type=float, default=60.0)
    parser.add_argument("--images", type=int, default=200, help="distinct photos sent")
    parser.add_argument("--parts", nargs="+", choices=["overload", "reload", "shadow"], default=["overload", "reload", "shadow"])
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "out" / "serve_ops.json")
    args = parser.parse_args()
    started = time.time()
    results: dict = {"command": "python benchmarks/serve_ops.py " + " ".join(sys.argv[1:]), "machine_before": machine()}
    payloads = make_payloads(args.images)
    with tempfile.TemporaryDirectory(prefix="cnnkit-serve-ops-") as tmp:
        work = Path(tmp)
        a = make_checkpoint("resnet18", work / "a.pt")
        import torch

        from cnnkit.models.checkpoint import load_checkpoint

        b_ckpt = load_checkpoint(str(a))
        torch.manual_seed(1)
        b_ckpt.state_dict = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                             for k, v in b_ckpt.state_dict.items()}
        b_ckpt.save(work / "b.pt")
        if "overload" in args.parts:
            results["overload"] = overload(args, a, work, payloads)
        if "reload" in args.parts:
            results["reload"] = reload_under_load(args, [a, work / "b.pt"], work, payloads)
        if "shadow" in args.parts:
            results["shadow"] = shadow_on_off(args, [a, work / "b.pt"], work, payloads)
    finish(results, started, args.output, markdown(results))


if __name__ == "__main__":
    main()
