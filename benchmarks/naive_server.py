"""The naive baseline of ``benchmarks/serve_load.py``: a model server written the way tutorials do.

Flask, the model loaded once at import, one image per forward pass, torch left at its default
thread count, no batching and no limits. It is deliberately not part of cnnkit. The model and
its preprocessing come from cnnkit (the same work per image as ``cnnkit serve``), so the
benchmark compares serving strategies only.

    CKPT=best.pt python benchmarks/naive_server.py --port 8100              # Flask's threaded server
    CKPT=best.pt gunicorn -w 2 -b 127.0.0.1:8100 --chdir benchmarks naive_server:app
"""

from __future__ import annotations

import argparse
import os

import torch
from flask import Flask, jsonify, request
from PIL import Image

from cnnkit.data.transforms import build_transforms
from cnnkit.models.checkpoint import load_checkpoint

app = Flask(__name__)
checkpoint = load_checkpoint(os.environ["CKPT"])
model = checkpoint.build_model("cpu")
transform = build_transforms(checkpoint.preprocess, train=False)


@app.route("/predict", methods=["POST"])
def predict():
    image = Image.open(request.files["image"]).convert("RGB")
    batch = transform(image).unsqueeze(0)
    with torch.no_grad():
        probs = model(batch).exp()[0]
    p, i = probs.max(0)
    return jsonify({"label": checkpoint.classes[int(i)], "probability": float(p)})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    app.run(host="127.0.0.1", port=args.port, threaded=True)
