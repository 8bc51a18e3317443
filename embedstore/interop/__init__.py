"""Files the tools pathologists already use can open: QuPath GeoJSON of a slide's tiles and
tissue (``export_geojson``), and the live rows as Parquet / Arrow tables for polars, pandas,
duckdb and ``pyarrow.dataset`` (``export_table``). ``slide_geometry``: the level-0 tile side of
a slide, from what the store recorded.
"""
from __future__ import annotations

from .geojson import export_geojson, tile_feature, tissue_features
from ..store.geometry import SlideGeometry, slide_geometry
from .table import export_table

__all__ = ["export_geojson", "export_table", "tile_feature", "tissue_features", "SlideGeometry",
           "slide_geometry"]
