"""Open-set scores compared (issue 15): which feature score, of which layer, separates unseen classes.

On a checkpoint trained by ``unknown_bench.py`` (resnet18 on the first 15 class folders of
flowers-20, ``--keep DIR``), the penultimate features (layer4, pooled) and the pooled outputs of
layer2 and layer3 are taken for the 15 classes' train/, valid/ and test/ photos and the other 5
classes' test/ photos (cached beside the checkpoint as ``.study.npz``), and each score is measured
as a detector of the 5 unseen classes on test/ (AUROC, FPR at 95 % TPR, higher score = known):
maximum softmax probability, max logit, energy; Mahalanobis distance to the nearest class mean
(shared covariance, ridge 0.05 or 0.01 of the mean variance, as cnnkit.models.openset fits it)
and k-NN cosine distance to the training features (Sun et al. 2022; k = 1, 10, 50) per layer;
sums of z-scores (standardised on valid/) of the confidence and one or more distances; the
relative Mahalanobis distance (Ren et al. 2021: less the distance to one Gaussian of all the
training features), ridge 0.01 or 0.001.

    python benchmarks/unknown_scores.py /work/keep/unknown/best.pt
"""
import sys
from pathlib import Path

import numpy as np
import torch

from cnnkit.evaluate import separation
from cnnkit.models.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unknown_features import class_split, features as feats, listing  # noqa: E402

torch.set_num_threads(2)
ck = load_checkpoint(sys.argv[1])
known, unknown = class_split()
model = ck.build_model(torch.device('cpu')).eval()
tr_p, tr_y = listing('train', known); va_p, _ = listing('valid', known); te_p, te_y = listing('test', known); un_p, _ = listing('test', unknown)
cache = Path(sys.argv[1]).with_suffix('.study.npz')
if cache.exists():
    d = np.load(cache, allow_pickle=True); TR, VA, TE, UN = (d[k].item() for k in ('tr', 'va', 'te', 'un'))
else:
    TR, VA, TE, UN = (feats(model, ck, p) for p in (tr_p, va_p, te_p, un_p)); np.savez(cache, tr=TR, va=VA, te=TE, un=UN)
def maha(layer, ridge=0.05, relative=False):
    X = TR[layer]; C = 15
    means = np.stack([X[tr_y == c].mean(0) for c in range(C)]); cen = X - means[tr_y]
    cov = cen.T @ cen / (len(X) - C); cov += ridge * np.trace(cov) / len(cov) * np.eye(len(cov)); P = np.linalg.inv(cov)
    if relative:
        mu0 = X.mean(0); c0 = X - mu0; cov0 = c0.T @ c0 / len(X); cov0 += ridge * np.trace(cov0) / len(cov0) * np.eye(len(cov0)); P0 = np.linalg.inv(cov0)
    def score(Z):
        d = np.stack([np.einsum('ij,jk,ik->i', Z - m, P, Z - m) for m in means], 1)
        if relative: d = d - np.einsum('ij,jk,ik->i', Z - mu0, P0, Z - mu0)[:, None]
        return np.sqrt(np.clip(d.min(1), 0, None)) if not relative else d.min(1)
    return score
def knn(layer, k=10):
    X = TR[layer]; Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    def score(Z):
        Zn = Z / np.linalg.norm(Z, axis=1, keepdims=True); s = Zn @ Xn.T
        return -np.sort(s, 1)[:, -k]
    return score
def softmax(L): e = np.exp(L - L.max(1, keepdims=True)); return e / e.sum(1, keepdims=True)
def msp(D): return softmax(D['logits']).max(1)
def energy(D): L = D['logits']; m = L.max(1); return m + np.log(np.exp(L - m[:, None]).sum(1))
def z(known_valid, x): return (x - known_valid.mean()) / known_valid.std()
print('test acc', (TE['logits'].argmax(1) == te_y).mean())
res = {}
res['msp'] = separation(msp(TE), msp(UN)); res['maxlogit'] = separation(TE['logits'].max(1), UN['logits'].max(1)); res['energy'] = separation(energy(TE), energy(UN))
dists = {}
for layer in ['layer2', 'layer3', 'layer4']:
    for name, f in [('maha', maha(layer)), ('maha.01', maha(layer, 0.01)), ('maha.001', maha(layer, 0.001)),
                    ('rmd.01', maha(layer, 0.01, relative=True)), ('rmd.001', maha(layer, 0.001, relative=True)),
                    ('knn10', knn(layer)), ('knn1', knn(layer, 1)), ('knn50', knn(layer, 50))]:
        dv, dt, du = f(VA[layer]), f(TE[layer]), f(UN[layer]); dists[(layer, name)] = (dv, dt, du)
        res[f'{layer} {name}'] = separation(-dt, -du)
for key in [('layer4', 'maha'), ('layer4', 'knn10'), ('layer3', 'maha'), ('layer3', 'knn10'), ('layer2', 'maha'),
            ('layer4', 'rmd.001'), ('layer3', 'rmd.001')]:
    dv, dt, du = dists[key]; cv = msp(VA)
    res[f'z(msp)-z({key})'] = separation(z(cv, msp(TE)) - z(dv, dt), z(cv, msp(UN)) - z(dv, du))
    ev = energy(VA); res[f'z(energy)-z({key})'] = separation(z(ev, energy(TE)) - z(dv, dt), z(ev, energy(UN)) - z(dv, du))
# multi-layer sum of z distances
for combo in [[('layer3', 'rmd.001'), ('layer4', 'rmd.001')], [('layer3', 'maha'), ('layer4', 'maha')], [('layer2', 'maha'), ('layer3', 'maha'), ('layer4', 'maha')], [('layer3', 'knn10'), ('layer4', 'knn10')]]:
    cv = msp(VA); kt = z(cv, msp(TE)); ku = z(cv, msp(UN))
    for key in combo: dv, dt, du = dists[key]; kt = kt - z(dv, dt); ku = ku - z(dv, du)
    res['z(msp)-' + '-'.join(f'z({k})' for k in combo)] = separation(kt, ku)
for k, v in res.items(): print(f"{k:60s} {v['auroc']:.3f} {v['fpr_at_95_tpr']:.3f}")
