"""``cnnkit inspect`` on real data (issue 15): planted cross-split leaks found, false pairs, time.

flowers-20 (``../shared/data/flowers-20``: 2,539 photos of 20 Oxford Flowers-102 classes, train /
valid / test) is copied to a temporary folder, first as it is, then with 30 test photos planted
into train/ under their own class (leaks), drawn with a fixed seed:

- 10 exact copies (the same bytes);
- 10 re-encoded at JPEG quality 60;
- 10 resized to 85-95 % of their size and cropped by up to 10 % of each side's length (random
  offsets; at most 10 % of the area lost in total).

``cnnkit inspect --json`` runs on each copy (the command a user runs, in a subprocess; the time
is its wall time, median of ``--repeats`` runs on the planted copy); with ``--checkpoint`` it also
compares the backbone's whitened features (``--similarity``), which is what finds the crops. A planted leak is found when
the pair (the test photo, its planted copy) is reported across splits. Every other pair reported
on the planted copy is compared with the pairs already found on the unplanted copy: those are in
flowers-20 as published (listed, to be looked at: real duplicates or false pairs), and anything
else is a false pair the planting caused. Written to benchmarks/out/inspect_bench.json;
``--report DIR`` keeps inspect's own report of the unplanted copy (inspect.html shows every pair
already in flowers-20 as published, with thumbnails, to be judged by eye).

    python benchmarks/inspect_bench.py [--phash-distance 6] [--repeats 3]
    python benchmarks/inspect_bench.py --checkpoint RUN/best.pt --report /tmp/published-pairs
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from limit import CNNKIT, FLOWERS_20, REPO, machine, subprocess_env  # noqa: E402

KINDS = ("exact", "jpeg q60", "resized+cropped")
PER_KIND = 10


def plant(data: Path, seed: int) -> dict[str, str]:
    """Copy ``PER_KIND`` test photos of each kind into train/ (same class): planted path -> test path."""
    rng = random.Random(seed)
    tests = sorted(data.glob("test/*/*.jpg"))
    chosen = rng.sample(tests, PER_KIND * len(KINDS))
    planted = {}
    for index, source in enumerate(chosen):
        kind = KINDS[index // PER_KIND]
        target = data / "train" / source.parent.name / f"planted_{index:02d}_{source.name}"
        if kind == "exact":
            shutil.copyfile(source, target)
        else:
            with Image.open(source) as opened:
                image = opened.convert("RGB")
            if kind == "resized+cropped":
                scale = rng.uniform(0.85, 0.95)
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
                crop_x, crop_y = rng.uniform(0, 0.05), rng.uniform(0, 0.05)  # a side's share cut at each end
                w, h = image.size
                box = (round(w * crop_x), round(h * crop_y), w - round(w * rng.uniform(0, 0.05)),
                       h - round(h * rng.uniform(0, 0.05)))
                image = image.crop(box)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=60 if kind == "jpeg q60" else 90)
            target.write_bytes(buffer.getvalue())
        planted[str(target)] = str(source)
    return planted


def inspect(data: Path, distance: int, backbone: list[str], report: Path | None = None) -> tuple[dict, float]:
    started = time.perf_counter()
    done = subprocess.run([*CNNKIT, "inspect", str(data), "--json", "--phash-distance", str(distance), "--no-progress",
                           *backbone, *(["--output", str(report), "--force"] if report else [])],
                          capture_output=True, text=True, env=subprocess_env())
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 10):  # 10: leaks found, as planted
        raise SystemExit(f"cnnkit inspect failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout), seconds


def pair_key(pair: dict, root: Path) -> frozenset[str]:
    return frozenset(str(Path(pair[side]["path"]).relative_to(root)) for side in ("a", "b"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phash-distance", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, help="a cnnkit checkpoint: near-duplicates by its features too")
    parser.add_argument("--similarity", type=float, default=None, help="with --checkpoint [default: inspect's]")
    parser.add_argument("--report", type=Path, help="inspect --output for the unplanted copy")
    args = parser.parse_args()
    backbone = ([] if args.checkpoint is None else ["--checkpoint", str(args.checkpoint.resolve())]
                + ([] if args.similarity is None else ["--similarity", str(args.similarity)]))
    results: dict = {"command": "python benchmarks/inspect_bench.py " + " ".join(sys.argv[1:]), "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="cnnkit-inspect-") as tmp:
        data = Path(tmp) / "flowers-20"
        shutil.copytree(FLOWERS_20, data)
        before, _ = inspect(data, args.phash_distance, backbone, args.report)
        published = {pair_key(p, data): p for p in before["pairs"]}
        planted = {str(Path(k).relative_to(data)): str(Path(v).relative_to(data))
                   for k, v in plant(data, args.seed).items()}
        times, report = [], None
        for _ in range(args.repeats):
            report, seconds = inspect(data, args.phash_distance, backbone)
            times.append(seconds)
    found = {pair_key(p, data): p for p in report["pairs"] if p["across_splits"]}
    kinds = {copy: KINDS[int(Path(copy).name.split("_")[1]) // PER_KIND] for copy in planted}
    per_kind = {kind: {"planted": PER_KIND, "found": 0, "distances": []} for kind in KINDS}
    for copy, source in planted.items():
        pair = found.get(frozenset((copy, source)))
        if pair is not None:
            per_kind[kinds[copy]]["found"] += 1
            per_kind[kinds[copy]]["distances"].append(pair["distance"])
            per_kind[kinds[copy]].setdefault("found_as", []).append(pair["kind"])
            per_kind[kinds[copy]].setdefault("similarities", []).append(pair["similarity"])
    planted_keys = {frozenset(item) for item in planted.items()}
    # Pairs between a planted copy and anything but its own source: the planting's false pairs.
    caused = [p for key, p in ((pair_key(p, data), p) for p in report["pairs"])
              if key not in planted_keys and key not in published]
    results.update({
        "images": report["images"], "phash_distance": args.phash_distance, "backbone": report["backbone"],
        "similarity": report["similarity"],
        "recall": sum(k["found"] for k in per_kind.values()) / len(planted), "per_kind": per_kind,
        "false_pairs_caused_by_planting": len(caused),
        "pairs_caused_by_planting": [{"kind": p["kind"], "distance": p["distance"], "similarity": p["similarity"],
                                      "a": p["a"]["path"], "b": p["b"]["path"]} for p in caused],
        "pairs_in_published_data": [{"kind": p["kind"], "distance": p["distance"], "similarity": p["similarity"],
                                     "a": p["a"], "b": p["b"]}
                                    for p in published.values()],
        "seconds": times, "seconds_median": statistics.median(times),
    })
    output = REPO / "benchmarks" / "out" / "inspect_bench.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    kinds_found = ", ".join(f"{k}: {v['found']}/{v['planted']}" for k, v in per_kind.items())
    print(f"`{results['command']}`; {results['machine']['cpu']}, {results['machine']['cores']} cores; "
          f"backbone: {report['backbone']}\n")
    print(f"{report['images']} images; planted leaks found: {results['recall']:.0%} "
          f"({kinds_found}); "
          f"false pairs from the planting: {len(caused)}; pairs already in flowers-20: {len(published)}; "
          f"inspect wall time: median {results['seconds_median']:.1f} s of {times}")


if __name__ == "__main__":
    main()
