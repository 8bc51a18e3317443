"""The LMDB catalog: tile key -> id, committed shards, finished units, slides, labels,
tombstones, errors and the writers that own temporary files.

One environment per store directory and per process (LMDB forbids opening it twice in a
process, and an environment must never cross a fork: it is reopened in the child).
Write transactions that fill the map grow it and retry; a map grown by another process is
adopted on the next transaction.
"""
from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from ..errors import CatalogDamagedError, ConfigError, ReadOnlyError

__all__ = ["Catalog", "open_catalog", "u64", "from_u64", "damaged", "check_data_file", "JsonCache"]

T = TypeVar("T")
DBS = ("meta", "keys", "shards", "order", "units", "slides", "labels", "tasks",
       "deleted", "errors", "writers", "claims")
OPTIONAL_DBS = {"claims"}   # added later: a read-only open of an older catalog lacks it
# what reading a damaged environment raises (besides lmdb.Error): undecodable records
_DAMAGE = (json.JSONDecodeError, UnicodeDecodeError, struct.error)
_LMDB_MAGIC = 0xBEEFC0DE


def damaged(store_dir: Path | str, detail: object) -> CatalogDamagedError:
    """The one error a damaged catalog gives, with how to recover."""
    return CatalogDamagedError(
        f"the catalog of {store_dir} is damaged ({' '.join(str(detail).split())}); the shards are intact: "
        f"rebuild it from them with `embedstore rebuild-catalog {store_dir}`")


def check_data_file(data: Path, store_dir: Path) -> None:
    """Check ``data.mdb``'s meta pages before LMDB maps it: a truncated file would kill the
    process with SIGBUS when LMDB touches a page past its end."""
    try:
        with open(data, "rb") as f:
            head = f.read(2 * 65536)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise damaged(store_dir, f"{data} is missing") from None
    best: tuple[int, int, int] | None = None   # (txnid, last page, page size)
    for off in {0, *(p for p in (4096, 8192, 16384, 32768, 65536) if p < len(head))}:
        meta = head[off + 16: off + 152]
        if len(meta) < 136 or struct.unpack_from("<I", meta, 0)[0] != _LMDB_MAGIC:
            continue
        psize = struct.unpack_from("<I", meta, 24)[0]
        last, txnid = struct.unpack_from("<QQ", meta, 120)
        if off not in (0, psize) or not psize:
            continue
        if best is None or txnid > best[0]:
            best = (txnid, last, psize)
    if best is None:
        raise damaged(store_dir, f"{data} is not an LMDB file")
    if size < (best[1] + 1) * best[2]:
        raise damaged(store_dir, f"{data} is truncated: {size} bytes, its last page ends at "
                                 f"{(best[1] + 1) * best[2]}")
MAX_KEY_BYTES = 500  # LMDB's key limit is 511 bytes
INITIAL_MAP = int(os.environ.get("EMBEDSTORE_LMDB_MAP", 64 << 20))


def u64(i: int) -> bytes:
    """Big-endian so that LMDB's byte order is numeric order."""
    return struct.pack(">Q", i)


def from_u64(b: bytes) -> int:
    return struct.unpack(">Q", b)[0]


def _j(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _uj(b: bytes | memoryview) -> Any:
    return json.loads(bytes(b))


class JsonCache(dict[bytes, Any]):
    """Decoded JSON by encoded value, for databases whose values repeat (labels: a few distinct
    ``[label, split, group]`` among millions of rows). Decoded values are shared: do not mutate."""

    def __missing__(self, b: bytes) -> Any:
        v = self[b] = _uj(b)
        return v


_ENVS: dict[tuple[int, str, bool], "Catalog"] = {}
_ENVS_LOCK = threading.RLock()


def _before_fork() -> None:
    # No transaction may be in flight across a fork: hold every catalog's lock while forking.
    _ENVS_LOCK.acquire()
    for c in _ENVS.values():
        c._lock.acquire()


def _after_fork_parent() -> None:
    for c in _ENVS.values():
        c._lock.release()
    _ENVS_LOCK.release()


def _after_fork_child() -> None:
    # The inherited environments must not be used here. Closing them is safe (no transaction
    # is open, and this pid owns no reader slots or file locks); it frees the path so the
    # child can open its own environment.
    for k, c in list(_ENVS.items()):
        c._lock.release()
        try:
            c.env.close()
        except Exception:
            pass
        del _ENVS[k]
    _ENVS_LOCK.release()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent,
                    after_in_child=_after_fork_child)


def open_catalog(path: Path, *, create: bool = False, lock: bool = True) -> "Catalog":
    """The process-wide catalog of the store at ``path`` (reopened after a fork)."""
    real = os.path.realpath(path)
    k = (os.getpid(), real, lock)
    with _ENVS_LOCK:
        cat = _ENVS.get(k)
        if cat is not None and not cat.same_files():  # the store was deleted and made anew
            try:
                cat.env.close()
            except Exception:
                pass
            cat = None
        if cat is None:
            cat = _ENVS[k] = Catalog(Path(real), create=create, lock=lock)
        return cat


class Catalog:
    def __init__(self, store_dir: Path, *, create: bool, lock: bool = True, dirname: str = "catalog") -> None:
        d = store_dir / dirname
        self.store_dir = store_dir
        if create:
            d.mkdir(parents=True, exist_ok=True)
        elif not d.is_dir():
            raise damaged(store_dir, f"{d} is missing")
        if (d / "data.mdb").exists() or not create:
            check_data_file(d / "data.mdb", store_dir)
        self.readonly = not lock
        # lock=False: LMDB's lock-free read-only mode, for a store nothing is writing
        # (for instance on a network filesystem read from another machine).
        try:
            self.env = lmdb.open(str(d), map_size=INITIAL_MAP, max_dbs=len(DBS) + 2, subdir=True,
                                 create=create, readonly=self.readonly, lock=lock,
                                 max_readers=1024, readahead=False)
        except lmdb.Error as e:
            raise damaged(store_dir, e) from None
        try:
            self.db = {n: self._open_db(n) for n in DBS}
        except lmdb.Error as e:
            self.env.close()
            raise damaged(store_dir, e) from None
        self._lock = threading.RLock()
        self.pid = os.getpid()
        self._data = d / "data.mdb"
        self._ino = self._inode()

    def _open_db(self, name: str) -> Any:
        try:
            return self.env.open_db(name.encode(), create=not self.readonly)
        except lmdb.NotFoundError:
            if self.readonly and name in OPTIONAL_DBS:
                return None
            raise

    def _inode(self) -> int | None:
        try:
            return os.stat(self._data).st_ino
        except OSError:
            return None

    def same_files(self) -> bool:
        """False when the environment's file was removed or replaced since it was opened."""
        return self._inode() == self._ino

    # -- transactions -------------------------------------------------------------------
    def _begin(self, write: bool) -> lmdb.Transaction[bytes]:
        for _ in range(3):
            try:
                return self.env.begin(write=write)
            except lmdb.MapResizedError:  # another process grew the map
                self.env.set_mapsize(0)
        return self.env.begin(write=write)

    def read(self, fn: Callable[[lmdb.Transaction[bytes]], T]) -> T:
        with self._lock:
            try:
                txn = self._begin(False)
                try:
                    return fn(txn)
                finally:
                    txn.abort()
            except (lmdb.Error, *_DAMAGE) as e:
                raise damaged(self.store_dir, e) from None

    def write(self, fn: Callable[[lmdb.Transaction[bytes]], T]) -> T:
        """Run ``fn`` in one write transaction; a full map is doubled and ``fn`` retried."""
        if self.readonly:
            raise ReadOnlyError("catalog opened read-only (lock=False); cannot write")
        with self._lock:
            while True:
                try:
                    txn = self._begin(True)
                except lmdb.Error as e:
                    raise damaged(self.store_dir, e) from None
                try:
                    out = fn(txn)
                    txn.commit()
                    return out
                except lmdb.MapFullError:
                    txn.abort()
                    self.env.set_mapsize(self.env.info()["map_size"] * 2)
                except (lmdb.Error, *_DAMAGE) as e:   # MDB_CORRUPTED, MDB_PAGE_FULL, bad records
                    txn.abort()
                    raise damaged(self.store_dir, e) from None
                except BaseException:
                    txn.abort()
                    raise

    # -- counters -----------------------------------------------------------------------
    def counter(self, txn: lmdb.Transaction[bytes], name: str) -> int:
        v = txn.get(name.encode(), db=self.db["meta"])
        return from_u64(v) if v else 0

    def bump(self, txn: lmdb.Transaction[bytes], name: str, by: int = 1) -> int:
        """Add ``by`` to a counter; returns its value before."""
        old = self.counter(txn, name)
        txn.put(name.encode(), u64(old + by), db=self.db["meta"])
        return old

    # -- snapshots ----------------------------------------------------------------------
    def shards_in_order(self, txn: lmdb.Transaction[bytes]) -> list[tuple[str, dict[str, Any]]]:
        out = []
        sh = self.db["shards"]
        for _, name in txn.cursor(db=self.db["order"]):
            rec = txn.get(name, db=sh)
            if rec is None:
                raise damaged(self.store_dir, f"shard {bytes(name).decode()!r} is ordered but not recorded")
            out.append((bytes(name).decode(), _uj(rec)))
        return out

    def deleted_ids(self, txn: lmdb.Transaction[bytes]) -> list[int]:
        return [from_u64(k) for k in txn.cursor(db=self.db["deleted"]).iternext(values=False)]

    def items(self, txn: lmdb.Transaction[bytes], db: str,
              prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        cur = txn.cursor(db=self.db[db])
        if not cur.set_range(prefix):
            return
        for k, v in cur:
            if not k.startswith(prefix):
                break
            yield bytes(k), bytes(v)

    def view_shards(self, txn: lmdb.Transaction[bytes]) -> list[tuple[str, dict[str, Any]]]:
        """Every committed view shard and its record, in name order."""
        out = []
        for k, v in txn.cursor(db=self.db["shards"]):
            if b'"kind":"view"' in bytes(v):  # cheap test first: most shards are base shards
                rec = _uj(v)
                if rec.get("kind") == "view":
                    out.append((bytes(k).decode(), rec))
        return out

    def json_map(self, db: str, prefix: bytes = b"") -> dict[str, Any]:
        """One database read whole in its own transaction: decoded key -> decoded JSON value."""
        return self.read(lambda t: {k[len(prefix):].decode(): _uj(v) for k, v in self.items(t, db, prefix)})

    def key_set(self, db: str) -> set[str]:
        """The keys of one database, read in their own transaction."""
        return self.read(lambda t: {bytes(k).decode()
                                    for k in t.cursor(db=self.db[db]).iternext(values=False)})

    def count(self, db: str) -> int:
        """Records in one database (LMDB keeps the count: nothing is listed)."""
        return int(self.read(lambda t: t.stat(self.db[db])["entries"]))

    def get_json(self, txn: lmdb.Transaction[bytes], db: str, key: str | bytes) -> Any:
        v = txn.get(key.encode() if isinstance(key, str) else key, db=self.db[db])
        return None if v is None else _uj(v)

    def put_json(self, txn: lmdb.Transaction[bytes], db: str, key: str | bytes, value: Any) -> None:
        txn.put(key.encode() if isinstance(key, str) else key, _j(value), db=self.db[db])

    # -- keys ---------------------------------------------------------------------------
    @staticmethod
    def key_bytes(key: str) -> bytes:
        b = key.encode()
        if len(b) > MAX_KEY_BYTES:
            raise ConfigError(f"tile key longer than {MAX_KEY_BYTES} bytes: {key[:60]!r}...")
        return b

    @staticmethod
    def encode_keys(keys: Sequence[str]) -> list[bytes]:
        """``keys`` encoded for the keys database (a key too long for LMDB is refused)."""
        out = [k.encode() for k in keys]
        if out and max(map(len, out)) > MAX_KEY_BYTES:
            Catalog.key_bytes(next(k for k in keys if len(k.encode()) > MAX_KEY_BYTES))
        return out

    def present(self, txn: lmdb.Transaction[bytes], keys: Sequence[bytes]) -> list[bytes]:
        """Those of ``keys`` (encoded) that have an id, in one ``getmulti``."""
        return [bytes(k) for k, _ in txn.cursor(db=self.db["keys"]).getmulti(keys)]

    def put_new_ids(self, txn: lmdb.Transaction[bytes], keys: Sequence[bytes], first: int) -> list[int]:
        """Give ``keys[i]`` (encoded) the id ``first + i``, all in one ``putmulti``; a key that
        already has an id (or comes earlier in ``keys``) keeps it. Returns the positions i of
        those keys."""
        n = len(keys)
        packed = struct.pack(f">{n}Q", *range(first, first + n))
        ids = [packed[j:j + 8] for j in range(0, 8 * n, 8)]
        cur = txn.cursor(db=self.db["keys"])
        if cur.putmulti(list(zip(keys, ids)), overwrite=False)[1] == n:
            return []
        return [i for i, ((_, got), mine) in enumerate(zip(cur.getmulti(keys), ids)) if bytes(got) != mine]

    def lookup_ids(self, txn: lmdb.Transaction[bytes], keys: Iterable[str]) -> list[int | None]:
        db = self.db["keys"]
        out: list[int | None] = []
        for k in keys:
            v = txn.get(self.key_bytes(k), db=db)
            out.append(from_u64(v) if v is not None else None)
        return out

    def close(self) -> None:
        self.env.close()


def label_key(task: str, key: str) -> bytes:
    return task.encode() + b"\x00" + key.encode()


def slide_key(slide: str, first_id: int) -> bytes:
    return slide.encode() + b"\x00" + u64(first_id)
