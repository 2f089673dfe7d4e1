"""Open-set scores chosen without looking at test/ (issue 15): each candidate is ranked by its
AUROC on valid/ (the 15 known classes' valid/ photos against the 5 unseen classes' valid/ photos)
and reported on test/ (180 known against 68 unseen photos), beside confidence alone.

On the checkpoint and feature cache of ``unknown_scores.py`` (``.study.npz`` beside it; the unseen
classes' valid/ features are added as ``.unseen-valid.npz``). Candidates, higher = known: the
confidence (maximum softmax probability); the Mahalanobis distance to the nearest class mean
(shared covariance) and the relative Mahalanobis distance (Ren et al. 2021) of layer3's or
layer4's pooled features, ridge 0.05 / 0.01 / 0.001 of the mean variance, on the features as
they are or L2-normalised; z(confidence) + w z(distance) for w = 0.5, 1, 2, and z(confidence) +
z(layer3) + z(layer4) of the same kind (z: standardised on the known classes' valid/ photos).

    python benchmarks/unknown_select.py /work/keep/unknown/best.pt
"""
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

from cnnkit.evaluate import separation
from cnnkit.models.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unknown_features import class_split, features, listing  # noqa: E402

torch.set_num_threads(2)
ckpt_path = Path(sys.argv[1])
ck = load_checkpoint(str(ckpt_path))
known, unknown = class_split()
model = ck.build_model(torch.device('cpu')).eval()
tr_p, tr_y = listing('train', known)
d = np.load(ckpt_path.with_suffix('.study.npz'), allow_pickle=True)
TR, VA, TE, UN = (d[k].item() for k in ('tr', 'va', 'te', 'un'))
unv_cache = ckpt_path.with_suffix('.unseen-valid.npz')
if unv_cache.exists():
    UNV = np.load(unv_cache, allow_pickle=True)['unv'].item()
else:
    UNV = features(model, ck, listing('valid', unknown)[0]); np.savez(unv_cache, unv=UNV)
print('images: valid known', len(VA['logits']), 'valid unseen', len(UNV['logits']), 'test known', len(TE['logits']), 'test unseen', len(UN['logits']))
SETS = {'VA': VA, 'UNV': UNV, 'TE': TE, 'UN': UN}

def norm(X): return X / np.linalg.norm(X, axis=1, keepdims=True)
def maha(layer, ridge, relative=False, normed=False):
    X = TR[layer]; X = norm(X) if normed else X; C = 15
    means = np.stack([X[tr_y == c].mean(0) for c in range(C)]); cen = X - means[tr_y]
    cov = cen.T @ cen / (len(X) - C); cov += ridge * np.trace(cov) / len(cov) * np.eye(len(cov)); P = np.linalg.inv(cov)
    if relative:
        mu0 = X.mean(0); c0 = X - mu0; cov0 = c0.T @ c0 / len(X); cov0 += ridge * np.trace(cov0) / len(cov0) * np.eye(len(cov0)); P0 = np.linalg.inv(cov0)
    def score(D):
        Z = D[layer]; Z = norm(Z) if normed else Z
        dd = np.stack([np.einsum('ij,jk,ik->i', Z - m, P, Z - m) for m in means], 1)
        if relative: dd = dd - np.einsum('ij,jk,ik->i', Z - mu0, P0, Z - mu0)[:, None]
        return -dd.min(1)   # higher = known
    return score
def softmax(L): e = np.exp(L - L.max(1, keepdims=True)); return e / e.sum(1, keepdims=True)
def msp(D): return softmax(D['logits']).max(1)

base = {'msp': msp}
for layer in ('layer3', 'layer4'):
    for ridge in (0.05, 0.01, 0.001):
        for rel in (False, True):
            for normed in (False, True):
                base[f'{layer} {"rmd" if rel else "maha"} r{ridge}{" l2" if normed else ""}'] = maha(layer, ridge, rel, normed)
vals = {name: {k: f(D) for k, D in SETS.items()} for name, f in base.items()}
def z(name, w=1.0):
    v = vals[name]; mu, sd = v['VA'].mean(), v['VA'].std()
    return {k: w * (x - mu) / sd for k, x in v.items()}
cands = {name: vals[name] for name in base}
feat_names = [n for n in base if n != 'msp']
for n in feat_names:
    for w in (0.5, 1, 2):
        zm, zd = z('msp'), z(n, w)
        cands[f'z(msp) + {w} z({n})'] = {k: zm[k] + zd[k] for k in SETS}
for a, b in itertools.product([n for n in feat_names if n.startswith('layer3')], [n for n in feat_names if n.startswith('layer4')]):
    if a.split(' ', 1)[1] != b.split(' ', 1)[1]: continue
    zm, za, zb = z('msp'), z(a), z(b)
    cands[f'z(msp) + z({a}) + z({b})'] = {k: zm[k] + za[k] + zb[k] for k in SETS}
    cands[f'z({a}) + z({b})'] = {k: za[k] + zb[k] for k in SETS}
rows = []
for name, v in cands.items():
    va = separation(v['VA'], v['UNV'])['auroc']; te = separation(v['TE'], v['UN'])['auroc']
    rows.append((va, te, name))
rows.sort(reverse=True)
conf_va = separation(vals['msp']['VA'], vals['msp']['UNV'])['auroc']; conf_te = separation(vals['msp']['TE'], vals['msp']['UN'])['auroc']
print(f'confidence: valid {conf_va:.3f} test {conf_te:.3f}')
for label, prod in (('cnnkit, open-set statistics version 1:', 'z(msp) + 1 z(layer4 maha r0.05)'),
                    ('cnnkit, version 2 (relative):', 'z(msp) + 1 z(layer4 rmd r0.01)')):
    print(label, [r for r in rows if r[2] == prod])
print('top 15 by valid AUROC:')
for va, te, name in rows[:15]:
    print(f'  valid {va:.3f}  test {te:.3f} (+{te - conf_te:.3f})  {name}')
print('top 5 by test AUROC:')
for va, te, name in sorted(rows, key=lambda r: -r[1])[:5]:
    print(f'  valid {va:.3f}  test {te:.3f} (+{te - conf_te:.3f})  {name}')
