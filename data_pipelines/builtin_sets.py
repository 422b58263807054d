"""Real data that ships inside installed packages, so the quickstart, tests and examples need no download.

Every set here is turned into shards by the same writer as user data and read back through the same loaders; this
module only produces the source images/points. Only images that load offline are used (some scikit-image samples
need pooch and a download; they are left out on purpose).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from .sources import ImageSource, PointSource, SourceItem
from .image_prep import as_uint8_hwc

BUILTIN_SETS_DEFAULT_SIZE = {"digits": 32, "photos256": 256, "faces25": 32}
DEFAULT_NUM_SAMPLES = {"photos256": 1000, "toy2d": 100_000}
PHOTO_CROP = 256
# (package, name): colour photographs shipped by scikit-image, scikit-learn and matplotlib, all at least 256 px a side.
PHOTOS = (
    ("skimage", "astronaut"), ("skimage", "coffee"), ("skimage", "chelsea"), ("skimage", "rocket"),
    ("skimage", "hubble_deep_field"), ("skimage", "retina"), ("skimage", "immunohistochemistry"),
    ("skimage", "stereo_motorcycle"), ("sklearn", "china.jpg"), ("sklearn", "flower.jpg"),
    ("matplotlib", "grace_hopper.jpg"),
)


def digits_source() -> ImageSource:
    """sklearn's 1,797 handwritten 8x8 digits (values 0..16) as grayscale uint8, labelled 0-9; the writer upsamples."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    items = [SourceItem(f"sklearn.load_digits[{i}]", int(d.target[i]), (lambda a=images[i]: Image.fromarray(a, "L")))
             for i in range(len(images))]
    return ImageSource(items, {"kind": "builtin", "name": "digits", "package": "scikit-learn"})


def faces_source() -> ImageSource:
    """scikit-image `lfw_subset`: 200 grayscale 25x25 patches, the first 100 faces (label 1), the rest not (label 0)."""
    from skimage.data import lfw_subset

    faces = lfw_subset()
    items = [SourceItem(f"skimage.data.lfw_subset[{i}]", int(i < 100),
                        (lambda a=as_uint8_hwc(faces[i]): Image.fromarray(a, "L"))) for i in range(len(faces))]
    return ImageSource(items, {"kind": "builtin", "name": "faces25", "package": "scikit-image"})


@lru_cache(maxsize=None)
def _load_photo(package: str, name: str) -> np.ndarray:
    if package == "skimage":
        import skimage.data

        image = getattr(skimage.data, name)()
        if isinstance(image, tuple):  # stereo_motorcycle returns (left, right, disparity)
            image = image[0]
    elif package == "sklearn":
        from sklearn.datasets import load_sample_image

        image = load_sample_image(name)
    else:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data(name) as f:
            image = np.asarray(Image.open(f).convert("RGB"))
    return as_uint8_hwc(image)


def photos_source(num_samples: int, seed: int) -> ImageSource:
    """`num_samples` random 256x256 crops, round-robin over the shipped photos (label = photo id), positions drawn
    from a generator seeded by `seed` so the set is the same on every machine."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(num_samples):
        pid = i % len(PHOTOS)
        h, w = _load_photo(*PHOTOS[pid]).shape[:2]
        top, left = int(rng.integers(0, h - PHOTO_CROP + 1)), int(rng.integers(0, w - PHOTO_CROP + 1))

        def load(pid=pid, top=top, left=left) -> Image.Image:
            return Image.fromarray(_load_photo(*PHOTOS[pid])[top : top + PHOTO_CROP, left : left + PHOTO_CROP])

        items.append(SourceItem(f"{PHOTOS[pid][1]}@{top},{left}", pid, load))
    return ImageSource(items, {"kind": "builtin", "name": "photos256", "photos": [p[1] for p in PHOTOS],
                               "crop": PHOTO_CROP, "seed": seed, "num_samples": num_samples})


def toy2d_points(formula: str, num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """2-D densities used by the latent-EBM papers' toy experiments.

    25gaussians: equal mixture on the grid {-4,-2,0,2,4}^2, sigma 0.1 per coordinate (label = component);
    8gaussians: equal mixture on a radius-2 circle, sigma 0.1 (label = component);
    swissroll: sklearn's swiss roll (noise 0.25) projected to (x, z) and scaled by 1/5, as in FFJORD.
    """
    rng = np.random.default_rng(seed)
    if formula == "swissroll":
        from sklearn.datasets import make_swiss_roll

        data, _ = make_swiss_roll(num_samples, noise=0.25, random_state=seed)
        return (data[:, [0, 2]] / 5.0).astype(np.float32), None
    if formula == "25gaussians":
        grid = np.array([-4.0, -2.0, 0.0, 2.0, 4.0])
        centers = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    elif formula == "8gaussians":
        angles = np.arange(8) * (2 * np.pi / 8)
        centers = 2.0 * np.stack([np.cos(angles), np.sin(angles)], -1)
    else:
        raise ValueError(f"unknown toy2d formula {formula!r}")
    labels = rng.integers(0, len(centers), num_samples)
    points = centers[labels] + 0.1 * rng.standard_normal((num_samples, 2))
    return points.astype(np.float32), labels.astype(np.int32)


def toy2d_source(formula: str, num_samples: int, seed: int) -> PointSource:
    points, labels = toy2d_points(formula, num_samples, seed)
    return PointSource(points, labels, {"kind": "builtin", "name": "toy2d", "formula": formula,
                                        "num_samples": num_samples, "seed": seed})


def open_builtin(name: str, num_samples: int | None, seed: int, formula: str) -> ImageSource | PointSource:
    if name == "digits":
        return digits_source()
    if name == "faces25":
        return faces_source()
    if name == "photos256":
        return photos_source(num_samples or DEFAULT_NUM_SAMPLES["photos256"], seed)
    if name == "toy2d":
        return toy2d_source(formula, num_samples or DEFAULT_NUM_SAMPLES["toy2d"], seed)
    raise ValueError(f"unknown built-in set {name!r}")
