"""Image-space augmented views for the view bank (``extract --views K``).

View ``v`` of tile ``key`` is a pure function of (recipe, seed, key, v): a dihedral transform
(flips and 90° rotations), H&E stain jitter in HED space (Ruifrok & Johnston's colour
deconvolution), and mild brightness/contrast/saturation jitter. Reproducible in any process.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["ViewRecipe", "make_view", "make_views"]

# RGB -> optical density -> HED (rows: haematoxylin, eosin, DAB stain vectors)
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


@dataclass(frozen=True)
class ViewRecipe:
    k: int = 8                     # views per tile
    seed: int = 0                  # base seed
    dihedral: bool = True          # random flip + 90° rotation
    hed_sigma: float = 0.03        # stain jitter: alpha ~ 1 + U(-s, s), beta ~ U(-s, s) per channel
    brightness: float = 0.1        # multiplicative jitter amplitude
    contrast: float = 0.1
    saturation: float = 0.1
    version: int = 1               # bump when the recipe's code changes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rng(recipe: ViewRecipe, key: str, v: int) -> np.random.Generator:
    h = hashlib.blake2b(f"{recipe.seed}|{key}|{v}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(h, "little"))


def _hed_jitter(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    rgb = np.maximum(img.astype(np.float32), 1.0) / 255.0
    od = -np.log(rgb)
    hed = od.reshape(-1, 3) @ _HED_FROM_RGB.astype(np.float32)
    alpha = rng.uniform(1 - s, 1 + s, 3).astype(np.float32)
    beta = rng.uniform(-s, s, 3).astype(np.float32)
    hed = hed * alpha + beta
    od2 = hed @ _RGB_FROM_HED.astype(np.float32)
    out = np.exp(-od2).reshape(img.shape) * 255.0
    return np.clip(out, 0, 255)


def make_view(img: np.ndarray, recipe: ViewRecipe, key: str, v: int) -> np.ndarray:
    """View ``v`` (1..K) of ``img: (S, S, 3) uint8`` -> (S, S, 3) uint8."""
    rng = _rng(recipe, key, v)
    x = img
    if recipe.dihedral:
        x = np.rot90(x, int(rng.integers(4)))
        if rng.integers(2):
            x = x[:, ::-1]
    f = _hed_jitter(np.ascontiguousarray(x), rng, recipe.hed_sigma) if recipe.hed_sigma else x.astype(np.float32)
    if recipe.brightness:
        f = f * rng.uniform(1 - recipe.brightness, 1 + recipe.brightness)
    if recipe.contrast:
        m = f.mean()
        f = (f - m) * rng.uniform(1 - recipe.contrast, 1 + recipe.contrast) + m
    if recipe.saturation:
        grey = f.mean(axis=2, keepdims=True)
        f = (f - grey) * rng.uniform(1 - recipe.saturation, 1 + recipe.saturation) + grey
    return np.clip(f + 0.5, 0, 255).astype(np.uint8)


def make_views(img: np.ndarray, recipe: ViewRecipe, key: str) -> np.ndarray:
    """(K, S, S, 3) uint8: views 1..K of one tile."""
    return np.stack([make_view(img, recipe, key, v) for v in range(1, recipe.k + 1)])
