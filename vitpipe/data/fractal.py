"""Formula-driven images for pretraining without natural images (as in FractalDB).

Each class is one random iterated function system (IFS): 2-4 affine maps drawn until the
attractor fills enough of the canvas to be a shape rather than a line or a dot. Each image
of a class renders that system with one coefficient jittered (FractalDB's "weight"
variation) plus a random flip and brightness, so the classes are visual
categories a network must learn to tell apart. Everything follows from one seed.
"""

from __future__ import annotations

import numpy as np

POINTS = 3000  # chaos-game iterations per image; enough to outline a 32-64 px attractor
BURN_IN = 20  # the first iterations are not yet on the attractor
MIN_FILL = 0.08  # fraction of pixels an attractor must cover to count as a shape...
MAX_FILL = 0.45  # ...and may cover at most, or it is a noisy square, not a shape


def sample_system(rng: np.random.Generator) -> np.ndarray:
    """An IFS as an array of maps, each (a, b, c, d, e, f, p): x' = [[a b][c d]] x + [e f]."""
    n = rng.integers(2, 5)
    maps = rng.uniform(-1.0, 1.0, size=(n, 6))
    det = np.abs(maps[:, 0] * maps[:, 3] - maps[:, 1] * maps[:, 2])
    p = (det + 1e-3) / (det + 1e-3).sum()
    return np.concatenate([maps, p[:, None]], axis=1)


def render(systems: np.ndarray, size: int, rng: np.random.Generator, points: int = POINTS) -> np.ndarray:
    """Render a batch of IFS (B x maxN x 7, zero-probability padding) to B x size x size uint8."""
    b, max_n, _ = systems.shape
    cum = np.cumsum(systems[:, :, 6], axis=1)
    cum[:, -1] = 1.0 + 1e-9
    xy = np.zeros((b, 2))
    trace = np.empty((points, b, 2))
    rows = np.arange(b)
    for t in range(points + BURN_IN):
        k = (rng.random(b)[:, None] > cum).sum(1)
        m = systems[rows, k]
        xy = np.stack(
            [m[:, 0] * xy[:, 0] + m[:, 1] * xy[:, 1] + m[:, 4], m[:, 2] * xy[:, 0] + m[:, 3] * xy[:, 1] + m[:, 5]],
            axis=1,
        )
        xy = np.clip(xy, -1e6, 1e6)  # a non-contractive map must not overflow into NaN
        if t >= BURN_IN:
            trace[t - BURN_IN] = xy
    lo, hi = trace.min(0), trace.max(0)  # B x 2: fit each attractor to its canvas
    scale = (size - 3) / np.maximum(hi - lo, 1e-9).max(1, keepdims=True)
    pix = np.floor((trace - lo) * scale + 1).astype(np.int64).clip(0, size - 1)
    img = np.zeros((b, size, size), dtype=np.uint8)
    img[np.broadcast_to(rows, (points, b)), pix[..., 1], pix[..., 0]] = 255
    return img


def fill_rate(img: np.ndarray) -> np.ndarray:
    return (img > 0).mean(axis=(-1, -2))


def make_classes(n_classes: int, size: int, seed: int) -> list[np.ndarray]:
    """`n_classes` systems whose attractors are shapes (MIN_FILL <= fill rate <= MAX_FILL)."""
    rng = np.random.default_rng(seed)
    systems: list[np.ndarray] = []
    while len(systems) < n_classes:
        batch = [sample_system(rng) for _ in range(64)]
        imgs = render(_pad(batch), size, rng, points=POINTS // 2)
        systems += [s for s, f in zip(batch, fill_rate(imgs)) if MIN_FILL <= f <= MAX_FILL]
    return systems[:n_classes]


def _pad(systems: list[np.ndarray]) -> np.ndarray:
    out = np.zeros((len(systems), 4, 7))
    for i, s in enumerate(systems):
        out[i, : len(s)] = s
    return out


def make_dataset(n_classes: int, per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images N x size x size x 3 uint8, labels N), N = n_classes * per_class, class-major."""
    systems = make_classes(n_classes, size, seed)
    rng = np.random.default_rng(seed + 1)
    batch = []
    for s in systems:
        for _ in range(per_class):
            v = s.copy()
            i, j = rng.integers(len(v)), rng.integers(6)
            v[i, j] *= rng.uniform(0.8, 1.2)  # one coefficient jittered: same family, new instance
            batch.append(v)
    imgs = np.concatenate([render(_pad(batch[i : i + 512]), size, rng) for i in range(0, len(batch), 512)])
    flip = rng.random(len(imgs)) < 0.5
    imgs[flip] = imgs[flip][:, :, ::-1]
    bright = rng.uniform(0.5, 1.0, len(imgs))
    imgs = (imgs * bright[:, None, None]).astype(np.uint8)
    labels = np.repeat(np.arange(n_classes), per_class)
    return np.repeat(imgs[..., None], 3, axis=3), labels
