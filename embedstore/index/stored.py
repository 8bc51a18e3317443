"""An index on disk (``STORE/index/``) and in memory: its metadata, commit protocol and queries.

Layout: ``index-<token>.faiss`` (faiss.write_index) and ``index.json`` (IndexInfo), written
in that order, each to a ``.partial`` name, fsynced, then renamed: ``index.json`` is the commit
record, so a crash leaves either the previous index or the new one, never a mix.

``index.json`` is read as untrusted input: its ``file`` must be a plain ``index-<token>.faiss``
name (no directory, no ``..``, not a link), the faiss file is always looked up inside
``STORE/index/``, and a file of another size than recorded, or one faiss cannot read, is
refused with one line naming it and how to rebuild.

An on-disk index (``info.on_disk``, built by ``index/ondisk.py``) has one more file,
``index-<token>.ivfdata`` (its inverted lists), published before the ``.faiss`` file of the same
token and found the same way: the name in ``index.json`` must be exactly that one, a plain file
of the recorded size; the ``.ivfdata`` path faiss keeps inside the ``.faiss`` file is never
used. It is memory-mapped read-only at load.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from embedstore.store.atomic import atomic_path, atomic_write_text
from embedstore.errors import DimensionMismatchError, ShapeError, StaleIndexError, VectorIndexError
from embedstore.index._vectors import deleted, log
from embedstore.index.choose import QUANTIZER_EF_SEARCH
from embedstore.index.ondisk import open_on_disk
from embedstore.store.protocol import StoreLike

__all__ = ["IndexInfo", "VectorIndex", "load_index", "read_index_info", "index_dir",
           "index_file", "ivfdata_file", "check_fresh", "require_gpu"]

INDEX_DIRNAME = "index"
INFO_NAME = "index.json"
FILE_PATTERN = re.compile(r"index-[0-9a-f]{12}\.faiss")    # what save_index names a faiss file
IVFDATA_SUFFIX = ".ivfdata"      # on-disk lists: index-<token>.ivfdata beside index-<token>.faiss
RERANK_ROWS = 1 << 14            # re-ranking gathers at most this many rows from the store at once
_FAISS_MESSAGE = re.compile(r"Error in .*? at \S+:\d+: (?:Error: )?(.*)")   # faiss's own words
FORMAT_VERSION = 1
GPU_MAX_K = 2048            # faiss GPU search returns at most this many neighbours


@dataclass(frozen=True)
class IndexInfo:
    """What ``index.json`` records about a built index."""

    factory: str                 # faiss.index_factory string (before the id map)
    kind: str                    # flat | hnsw | ivf-flat | ivf-sq8 | ivf-pq
    metric: str                  # cosine (vectors L2-normalised, inner product) | ip
    dim: int                     # vector dimension
    nlist: int                   # inverted lists (0 unless IVF)
    params: dict                 # tuned search parameters: nprobe | efSearch, and k_factor
    n_covered: int               # rows in the index
    max_id: int                  # largest tile id in the index (update adds ids above it)
    n_rows_committed: int        # store.n_rows_committed when last built or updated
    recall_at_10: float          # recall@10 vs exact search at params (query rows left out)
    target_recall: float         # what the sweep aimed for
    recall_met: bool             # recall_at_10 >= target_recall
    qps: float                   # queries/s at params (batched, re-ranking included)
    n_queries: int               # held-out queries used for recall and qps
    build_seconds: float         # training + adding rows
    tune_seconds: float          # ground truth + parameter sweep
    memory_bytes: int            # size of the faiss file
    curve: list = field(default_factory=list)   # every setting swept: params, recall, qps
    reason: str = ""             # why this kind was chosen
    seed: int = 0                # training sample and query sample seed
    gpu: bool = False            # trained/added on GPU
    created: str = ""            # ISO time of the build
    updated: str = ""            # ISO time of the last update_index ("" if none)
    n_added: int = 0             # rows added by update_index since the build
    candidates: list = field(default_factory=list)   # auto: every candidate measured on the
                                 # sample (label, params, recall, qps predicted at full size,
                                 # sample_qps, memory_bytes, build_seconds, chosen)
    sample_size: int = 0         # rows of the store sample the candidates were measured on
    faiss_version: str = ""      # faiss that wrote the file
    file: str = ""               # faiss file name inside the index directory
    on_disk: bool = False        # inverted lists in ``ivfdata``, memory-mapped (ondisk.py)
    ivfdata: str = ""            # on disk: index-<token>.ivfdata beside ``file`` (same token)
    ivfdata_bytes: int = 0       # on disk: its size
    format_version: int = FORMAT_VERSION

    @property
    def k_factor(self) -> int:
        return int(self.params.get("k_factor", 1))

    def describe(self) -> str:
        knobs = " ".join(f"{key}={val}" for key, val in self.params.items()
                         if key != "k_factor")
        rerank = f" rerank={10 * self.k_factor}" if self.kind == "ivf-pq" else ""
        return f"{self.factory} {knobs}{rerank}".strip()

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "IndexInfo":
        known = {f.name for f in fields(cls)}
        return cls(**{key: val for key, val in data.items() if key in known})


def index_dir(store: StoreLike) -> Path:
    return Path(store.path) / INDEX_DIRNAME


def read_index_info(store: StoreLike) -> IndexInfo | None:
    """The saved IndexInfo, or None when no index has been built."""
    path = index_dir(store) / INFO_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ShapeError(f"a JSON {type(data).__name__}, not an object")
        info = IndexInfo.from_json(data)
        _check_types(info)
    except (ValueError, TypeError) as exc:
        raise VectorIndexError(f"unreadable {path}: {' '.join(str(exc).split())[:200]}; rebuild "
                               f"with `embedstore index {store.path}`") from None
    return info


_NUMBER = (int, float)
_TYPES: dict[str, type | tuple[type, ...]] = {
    "factory": str, "kind": str, "metric": str, "dim": int, "nlist": int, "params": dict,
    "n_covered": int, "max_id": int, "n_rows_committed": int, "memory_bytes": int, "file": str,
    "n_added": int, "recall_at_10": _NUMBER, "target_recall": _NUMBER, "qps": _NUMBER,
    "build_seconds": _NUMBER, "tune_seconds": _NUMBER, "candidates": list, "sample_size": int,
    "on_disk": bool, "ivfdata": str, "ivfdata_bytes": int}


def _check_types(info: IndexInfo) -> None:
    """TypeError naming the first field of ``info`` (read from JSON) that has the wrong type."""
    for name, kind in _TYPES.items():
        value = getattr(info, name)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ShapeError(f"field {name!r} is {value!r}")


def index_file(store: StoreLike, info: IndexInfo) -> Path:
    """The faiss file ``info`` names, inside ``STORE/index/``: VectorIndexError unless ``file``
    is a plain name save_index could have written (never a path, ``..`` or a link)."""
    directory = index_dir(store)
    rebuild = f"rebuild with `embedstore index {store.path}`"
    if not FILE_PATTERN.fullmatch(info.file):
        raise VectorIndexError(f"{directory / INFO_NAME} names the faiss file {info.file!r}, "
                               "which is not a plain index-<token>.faiss name inside "
                               f"{directory}; refusing to read it; {rebuild}")
    return _plain_file(directory / info.file, info.memory_bytes, rebuild)


def _plain_file(path: Path, recorded: int, rebuild: str) -> Path:
    """``path`` if it is a plain file (not a link) of the ``recorded`` size (0: unrecorded)."""
    if path.is_symlink():
        raise VectorIndexError(f"{path} is a link; index files are plain files inside "
                               f"{path.parent}; {rebuild}")
    if not path.is_file():
        raise VectorIndexError(f"{path} named by index.json is missing; {rebuild}")
    size = path.stat().st_size
    if recorded and size != recorded:
        raise VectorIndexError(f"{path} is {size:,} bytes but index.json records "
                               f"{recorded:,} (truncated or replaced); {rebuild}")
    return path


def ivfdata_file(store: StoreLike, info: IndexInfo) -> Path:
    """The on-disk lists of ``info``: ``index-<token>.ivfdata`` beside its ``.faiss`` file inside
    ``STORE/index/`` (VectorIndexError for any other name, a link, a missing file or another
    size than recorded)."""
    directory = index_dir(store)
    rebuild = f"rebuild with `embedstore index {store.path}`"
    want = Path(info.file).stem + IVFDATA_SUFFIX
    if info.ivfdata != want:
        raise VectorIndexError(f"{directory / INFO_NAME} names the on-disk lists {info.ivfdata!r},"
                               f" not {want!r} beside {info.file}; refusing to read it; {rebuild}")
    return _plain_file(directory / want, info.ivfdata_bytes, rebuild)


def check_fresh(store: StoreLike, info: IndexInfo) -> None:
    committed = int(store.n_rows_committed)
    if committed > info.n_rows_committed:
        raise StaleIndexError(
            f"index covers {info.n_rows_committed:,} of {committed:,} rows; run "
            f"`embedstore index {store.path} --update`")


def require_gpu() -> None:
    import faiss

    count = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if count <= 0:
        raise VectorIndexError("gpu=True but faiss sees no GPU (faiss.get_num_gpus() == 0; is faiss-cpu"
                          " installed?); install embedstore[gpu] on a CUDA machine or drop --gpu")


def to_gpu(index: Any, kind: str) -> tuple[Any, Any]:
    """(gpu index, resources to keep alive); raises VectorIndexError when faiss cannot move it."""
    import faiss

    require_gpu()
    res = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = kind == "ivf-pq"   # float16 lookup tables: needed for large PQ codes
    try:
        return faiss.index_cpu_to_gpu(res, 0, index, options), res
    except RuntimeError as exc:
        raise VectorIndexError(f"faiss cannot run a {kind} index on GPU ({exc}); drop --gpu") from exc


def save_index(index: Any, info: IndexInfo, directory: Path, ivfdata: str = "") -> IndexInfo:
    """Write the faiss file, then index.json (the commit), then drop older files. ``ivfdata``:
    the on-disk lists ``index-<token>.ivfdata``, already published in ``directory``; the faiss
    file then takes its token."""
    import faiss

    directory.mkdir(parents=True, exist_ok=True)
    token = Path(ivfdata).stem[len("index-"):] if ivfdata else uuid.uuid4().hex[:12]
    name = f"index-{token}.faiss"
    with atomic_path(directory / name) as tmp:
        faiss.write_index(index, str(tmp))
    extra: dict[str, Any] = {"on_disk": True, "ivfdata": ivfdata,
             "ivfdata_bytes": (directory / ivfdata).stat().st_size} if ivfdata else \
        {"on_disk": False, "ivfdata": "", "ivfdata_bytes": 0}
    info = replace(info, file=name, memory_bytes=(directory / name).stat().st_size,
                   faiss_version=faiss.__version__, **extra)
    atomic_write_text(directory / INFO_NAME, json.dumps(info.to_json(), indent=1) + "\n")
    for old in directory.iterdir():
        if old.name not in (name, ivfdata) and old.suffix in (".faiss", ".partial",
                                                              IVFDATA_SUFFIX):
            old.unlink(missing_ok=True)
    return info


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def rerank(store: StoreLike, q: np.ndarray, cand: np.ndarray, metric: str
           ) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores for candidate ids (nq, kk) from the store's own vectors, re-sorted.

    q: (nq, dim) float32 prepared. Candidates are gathered in the store dtype, converted once,
    and scored by a batched matrix-vector product (cosine divides by each candidate's norm).
    """
    nq, kk = cand.shape
    valid = cand >= 0
    if valid.any():   # rows deleted since the build: the store no longer serves them
        uniq, inv = np.unique(cand[valid], return_inverse=True)
        valid[valid] = ~deleted(store, uniq)[inv]
    if not valid.any():
        return np.full((nq, kk), -np.inf, dtype=np.float32), np.full((nq, kk), -1, np.int64)
    filler = cand[valid][0]                       # any real id stands in for -1, then masked
    safe = np.where(valid, cand, filler)
    scores = np.empty((nq, kk), dtype=np.float32)
    chunk = max(1, min((1 << 24) // max(1, kk * store.dim * 4),   # ~16 MB of float32 per chunk
                       RERANK_ROWS // max(1, kk)))
    for s in range(0, nq, chunk):
        e = min(nq, s + chunk)
        x = np.asarray(store.gather(safe[s:e].ravel()), dtype=np.float32)
        x = x.reshape(e - s, kk, store.dim)
        dots = np.matmul(x, q[s:e, :, None])[:, :, 0]
        if metric == "cosine":
            norms = np.sqrt(np.einsum("ijk,ijk->ij", x, x))
            dots /= np.where(norms > 0, norms, 1.0)
        scores[s:e] = dots
    scores[~valid] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")
    ids = np.take_along_axis(np.where(valid, cand, -1), order, axis=1)
    return np.take_along_axis(scores, order, axis=1), ids


class VectorIndex:
    """A loaded faiss index plus its IndexInfo; ``query`` applies the tuned parameters."""

    def __init__(self, index: Any, info: IndexInfo, gpu_resources: Any = None) -> None:
        self.index = index
        self.info = info
        self._gpu_resources = gpu_resources   # must outlive a GPU index

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def query(self, store: StoreLike, q: np.ndarray, k: int, params: dict | None = None,
              widen: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Prepared queries (nq, dim) float32 -> (scores, ids) (nq, kk) best first, where
        kk = k * k_factor * widen candidates (PQ candidates re-ranked exactly); ``widen`` also
        multiplies nprobe / efSearch, for filtered searches that need more candidates."""
        import faiss

        params = dict(self.info.params if params is None else params)
        kk = min(max(1, k * int(params.get("k_factor", 1)) * widen), max(1, self.ntotal))
        if self._gpu_resources is not None:
            kk = min(kk, GPU_MAX_K)
        space = faiss.GpuParameterSpace() if self._gpu_resources is not None \
            else faiss.ParameterSpace()
        if "nprobe" in params:
            nprobe = min(self.info.nlist, int(params["nprobe"]) * widen)
            space.set_index_parameter(self.index, "nprobe", nprobe)
            if "_HNSW" in self.info.factory:   # an HNSW quantizer must look wider than nprobe
                space.set_index_parameter(self.index, "quantizer_efSearch",
                                          max(QUANTIZER_EF_SEARCH, 2 * nprobe))
        if "efSearch" in params:
            space.set_index_parameter(self.index, "efSearch",
                                      max(kk, int(params["efSearch"]) * widen))
        scores, ids = self.index.search(np.ascontiguousarray(q, dtype=np.float32), kk)
        if self.info.kind == "ivf-pq":
            return rerank(store, q, ids, self.info.metric)
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        return scores, ids


def load_index(store: StoreLike, gpu: bool = False, check_stale: bool = True) -> VectorIndex:
    """Read ``STORE/index``; StaleIndexError when rows were committed after it was built."""
    import faiss

    info = read_index_info(store)
    if info is None:
        raise VectorIndexError(f"no index in {index_dir(store)}; build one with "
                          f"`embedstore index {store.path}`")
    if info.dim != store.dim:
        raise DimensionMismatchError(f"index has dim {info.dim} but the store holds dim "
                                     f"{store.dim}; rebuild with `embedstore index {store.path}`")
    if check_stale:
        check_fresh(store, info)
    path = index_file(store, info)
    if info.on_disk and gpu:
        raise VectorIndexError(f"{path} is an on-disk index, searched on CPU from its mapped "
                               "lists; drop --gpu")
    ivfdata = ivfdata_file(store, info) if info.on_disk else None
    try:
        index = faiss.read_index(str(path)) if ivfdata is None else open_on_disk(path, ivfdata)
    except VectorIndexError as exc:
        raise VectorIndexError(f"{exc}; rebuild with `embedstore index {store.path}`") from None
    except (RuntimeError, MemoryError) as exc:       # truncated, garbage, crafted sizes
        text = " ".join(str(exc).split())
        found = _FAISS_MESSAGE.search(text)
        why = "".join(c if c.isprintable() and c.isascii() else "?"
                      for c in (found.group(1) if found else text))[:160]
        raise VectorIndexError(f"{path} is not a readable faiss index ({why}); rebuild with "
                               f"`embedstore index {store.path}`") from None
    if index.ntotal != info.n_covered or index.d != info.dim:
        raise VectorIndexError(f"{path} holds {index.ntotal:,} rows of dim {index.d} but "
                               f"index.json says {info.n_covered:,} of dim {info.dim}; rebuild "
                               f"with `embedstore index {store.path}`")
    if gpu and info.kind == "hnsw":
        require_gpu()
        log.warning("faiss has no GPU HNSW; searching %s on CPU", info.factory)
    elif gpu:
        gindex, res = to_gpu(index, info.kind)
        return VectorIndex(gindex, info, res)
    log.debug("loaded %s (%d rows) from %s", info.factory, info.n_covered, path)
    return VectorIndex(index, info)
