"""Embedding an image file with the backbone another run recorded (a store's STORE.json holds
its spec and weights sha256): what searching a store by image needs.

    embed = image_embedder(st.meta.backbone, st.meta.weights_sha256, tile_size=224, origin=st.path)
    vec = embed(Path("query.png"))                     # (dim,) float32
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackboneMismatchError, SourceError, UnknownBackboneError
from ._load import create_backbone
from .backbone import Backbone
from .spec import BackboneSpec

log = logging.getLogger("embedstore.backbones")

__all__ = ["recorded_backbone", "read_rgb", "image_embedder"]


def recorded_backbone(spec: Mapping[str, Any], weights_sha256: str,
                      origin: str | os.PathLike[str] = "the store") -> Backbone:
    """The backbone recorded as ``spec`` (``BackboneSpec.to_dict()``) and ``weights_sha256``,
    rebuilt here; BackboneMismatchError when the weights found here are other ones."""
    if spec.get("kind") == "imported" or not spec.get("kind"):
        raise UnknownBackboneError(
            f"backbone unknown: {origin} was imported with encoder {spec.get('name')!r}, which the "
            "registry does not name, so a query image cannot be embedded like its tiles; "
            "search by --key or --vector instead")
    bspec = BackboneSpec.from_dict(spec)
    bb = create_backbone(bspec, random_init=weights_sha256.startswith("random-init"))
    if not weights_sha256:
        log.warning("%s records no weights sha256 (imported features): cannot check that the "
                    "weights found for %r are the ones that made it", origin, bspec.name)
    elif bb.weights_sha256 != weights_sha256:
        raise BackboneMismatchError(f"the weights found for {bspec.name!r} differ from the ones that "
                                    f"made {origin} (sha256 {weights_sha256[:12]}...)")
    return bb


def read_rgb(path: Path, size: int | None = None) -> np.ndarray:
    """The image at ``path`` as (h, w, 3) uint8 RGB, resized bilinearly to (size, size) when
    ``size`` is given and differs; SourceError when it is not a readable image."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except OSError as exc:                   # PIL's UnidentifiedImageError is an OSError
        raise SourceError(f"{path} is not a readable image ({' '.join(str(exc).split())})") from None
    if size and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img)


def image_embedder(spec: Mapping[str, Any], weights_sha256: str, tile_size: int | None = None,
                   origin: str | os.PathLike[str] = "the store") -> Callable[[Path], np.ndarray]:
    """A function embedding one image file -> (dim,) float32 with the recorded backbone (built
    on first use, once), the image resized to the recorded ``tile_size`` first."""
    built: list[Backbone] = []

    def embed(path: Path) -> np.ndarray:
        img = read_rgb(path, tile_size)
        if not built:
            built.append(recorded_backbone(spec, weights_sha256, origin))
        return np.asarray(built[0].embed(img[None]).numpy()[0], dtype=np.float32)
    return embed
