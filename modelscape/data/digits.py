"""scikit-learn's bundled handwritten digits (1797 8x8 images, no download) as a base batch function.

The images are split once, deterministically, into a *training pool* and a *held-out pool* (stratified by
digit, ``test_fraction`` of each digit held out, fixed by ``split_seed``, the same for every trial and job).
The two pools never share an image:

- the test set is the held-out pool: ``X_te, y_te = digits_test_set(...)``, put into the config as
  ``X_te``/``y_te`` (the job then uses it instead of drawing a test set from the batch function);
- ``digits_bfn`` draws training samples from the training pool only: online, ``bsz`` fresh distinct images
  per step; offline, the job draws ``N_SAMPLES`` images once per trial (seeded by the trial) and trains on them.

The job draws a test set from the batch function when the config has no ``X_te``; ``digits_bfn`` refuses to
serve one from the training pool (it names ``X_te`` and ``N_TEST`` in its signature to tell), so a forgotten
test set is an error before training, never a test set that overlaps the training samples.

Inputs are flat 64-d float32 vectors: each pixel centred on its training-pool mean and all pixels divided by
one common scale, so the average pixel variance is 1 (``standardize=True``), or the raw 0..16 values scaled
to 0..1. Targets are class indices ``0..K-1`` in the order of ``classes`` (for ``LOSS='cross_entropy'``), or
with ``binary=True`` float targets of shape ``(N, 1)``: +1 for the first group of digits, -1 for the second
(for MSE).

    from modelscape.data import digits_bfn, digits_test_set
    X_te, y_te = digits_test_set(classes=[3, 8], binary=True)
    global_config.update(X_te=X_te, y_te=y_te, ONLINE=False, N_SAMPLES=500)
    bfn_config = dict(base_bfn=digits_bfn, classes=[3, 8], binary=True)
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from modelscape.data.synthetic import fixed_bfn
from modelscape.utils import require

N_IMAGES = 1797
SPLITS = ("train", "test")


@functools.lru_cache(maxsize=1)
def _raw():
    # scikit-learn is optional (the extra examples), needed only for the digits data
    d = require("sklearn.datasets", "examples", needed_by="the digits data").load_digits()
    return d.data.astype(np.float32), d.target.astype(np.int64)


def _groups(classes, binary):
    """``classes`` -> a list of groups of digits; each group is one label."""
    if classes is None:
        if binary:
            return [(0, 2, 4, 6, 8), (1, 3, 5, 7, 9)]  # even vs odd
        return [(c,) for c in range(10)]
    groups = []
    for c in classes:
        g = tuple(int(v) for v in c) if isinstance(c, (list, tuple, np.ndarray)) else (int(c),)
        groups.append(g)
    flat = [v for g in groups for v in g]
    bad = [v for v in flat if not 0 <= v <= 9]
    if bad:
        raise ValueError(f"classes must be digits 0..9 (or lists of them), got {bad}")
    if len(set(flat)) != len(flat):
        raise ValueError(f"classes name a digit twice: {list(classes)}")
    if len(groups) < 2:
        raise ValueError(f"classes must name at least two classes, got {list(classes)}")
    if binary and len(groups) != 2:
        raise ValueError(f"binary=True needs exactly two classes (each a digit or a list of digits), got "
                         f"{list(classes)}")
    return groups


@functools.lru_cache(maxsize=32)
def _pools(groups: tuple, binary: bool, standardize: bool, test_fraction: float, split_seed: int):
    """(X_train, y_train, X_test, y_test) as CPU tensors: the fixed, disjoint training and held-out pools."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    data, target = _raw()
    rng = np.random.default_rng(split_seed)
    train_idx, test_idx = [], []
    for digit in range(10):  # stratified: the same fraction of every digit is held out
        idx = np.flatnonzero(target == digit)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx, test_idx = np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))
    label_of = {d: k for k, g in enumerate(groups) for d in g}

    def pick(idx):
        idx = idx[np.isin(target[idx], list(label_of))]
        return data[idx], np.array([label_of[t] for t in target[idx]], dtype=np.int64)

    (X_tr, lab_tr), (X_te, lab_te) = pick(train_idx), pick(test_idx)
    if standardize:
        mean = X_tr.mean(0)
        scale = np.sqrt(((X_tr - mean) ** 2).mean())  # one scale: average pixel variance 1
        X_tr, X_te = (X_tr - mean) / scale, (X_te - mean) / scale
    else:
        X_tr, X_te = X_tr / 16.0, X_te / 16.0

    def targets(lab):
        if binary:
            return torch.from_numpy(np.where(lab == 0, 1.0, -1.0).astype(np.float32)[:, None])
        return torch.from_numpy(lab)

    return (torch.from_numpy(np.ascontiguousarray(X_tr, dtype=np.float32)), targets(lab_tr),
            torch.from_numpy(np.ascontiguousarray(X_te, dtype=np.float32)), targets(lab_te))


def digits_pools(classes=None, binary=False, standardize=True, test_fraction=0.25, split_seed=0):
    """The fixed split: ``(X_train_pool, y_train_pool, X_heldout, y_heldout)`` (CPU tensors, disjoint images)."""
    groups = tuple(_groups(classes, binary))
    return _pools(groups, bool(binary), bool(standardize), float(test_fraction), int(split_seed))


def digits_test_set(classes=None, binary=False, standardize=True, n=None, test_fraction=0.25, split_seed=0,
                    device=None):
    """The held-out test set ``(X_te, y_te)``: every held-out image of the chosen classes, or the first ``n``.

    Give it the same ``classes``/``binary``/``standardize`` as the batch function, and put it into the
    config as ``X_te``/``y_te``. ``n`` larger than the held-out pool returns the whole pool.
    """
    _, _, X, y = digits_pools(classes, binary, standardize, test_fraction, split_seed)
    if n is not None:
        X, y = X[:n], y[:n]
    if device is not None:
        X, y = X.to(device), y.to(device)
    return X, y


def digits_bfn(bsz, gen=None, X=None, y=None, classes=None, binary=False, standardize=True, split="train",
               test_fraction=0.25, split_seed=0, X_te=None, N_TEST=None, **kwargs):
    """Base batch function over the digits: ``batch_fn(step) -> (X, y)``, X of shape ``(bsz, 64)``.

    Args:
        bsz: images per batch (online) or in the training set (offline).
        gen: the torch.Generator that picks the images (the job seeds it by trial); its device is used.
        X, y: a fixed training set (offline): every step returns it.
        classes: the digits to use, e.g. ``[3, 8]`` or ``[[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]`` (a list is one
            class); default all ten digits (even vs odd with ``binary``).
        binary: +-1 float targets of shape (bsz, 1) for the two classes (MSE); else class indices (int64).
        standardize: centre each pixel and scale to unit average variance (training-pool statistics).
        split: ``"train"`` draws ``bsz`` distinct images of the training pool per call of ``batch_fn``;
            ``"test"`` returns the first ``bsz`` held-out images (all of them if ``bsz`` is larger).
        test_fraction, split_seed: the fixed split (see the module docstring).
        X_te, N_TEST: read from the job's config (you do not pass them): a job without ``X_te`` in its config
            would take its test set from this function's training pool, so that is an error.
    """
    if X is not None and y is not None:
        return fixed_bfn(X, y)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "train" and N_TEST is not None and X_te is None:
        raise ValueError("digits_bfn serves training images only, and this job has no held-out test set: put one "
                         "in the config, X_te, y_te = digits_test_set(classes=..., binary=...) and "
                         "global_config.update(X_te=X_te, y_te=y_te), so the test images are never trained on")
    X_pool, y_pool, X_held, y_held = digits_pools(classes, binary, standardize, test_fraction, split_seed)
    device = gen.device if gen is not None else torch.device("cpu")
    if split == "test":
        Xt, yt = X_held[:bsz].to(device), y_held[:bsz].to(device)
        return fixed_bfn(Xt, yt)
    n_pool = len(X_pool)
    if bsz > n_pool:
        raise ValueError(f"digits_bfn: asked for {bsz} training images but the training pool of classes "
                         f"{classes if classes is not None else 'all'} holds {n_pool}; lower N_SAMPLES")
    X_pool, y_pool = X_pool.to(device), y_pool.to(device)

    def batch_fn(step):
        idx = torch.randperm(n_pool, generator=gen, device=device)[:bsz]
        return X_pool[idx], y_pool[idx]

    return batch_fn


__all__ = ["digits_bfn", "digits_test_set", "digits_pools"]
