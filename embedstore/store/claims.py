"""Unit claims: a writer claims a unit before working on it, so two writers over one source do
not both embed it. A claim is a catalog record ``unit -> writer token``; writers are recorded
with host, pid and start time, so a claim of a dead writer is taken over."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._process import process_alive
from .catalog import Catalog

__all__ = ["claim_unit", "release_claims"]


def claim_unit(cat: Catalog, token: str, unit: str) -> bool:
    """Claim ``unit`` for writer ``token`` in one transaction: False when the unit is done or
    claimed by another writer that is alive (or runs on another host, unknowable here)."""
    def txn(t: Any) -> bool:
        if t.get(unit.encode(), db=cat.db["units"]) is not None:
            return False
        owner = t.get(unit.encode(), db=cat.db["claims"])
        if owner is not None and bytes(owner).decode() != token:
            ident = cat.get_json(t, "writers", bytes(owner))
            if ident is not None and process_alive(ident) is not False:
                return False
        t.put(unit.encode(), token.encode(), db=cat.db["claims"])
        return True
    return cat.write(txn)


def release_claims(cat: Catalog, token: str, units: Iterable[str]) -> None:
    """Drop writer ``token``'s claims on ``units`` and its writer record (it is closing)."""
    mine = token.encode()

    def txn(t: Any) -> None:
        for u in units:
            if t.get(u.encode(), db=cat.db["claims"]) == mine:
                t.delete(u.encode(), db=cat.db["claims"])
        t.delete(mine, db=cat.db["writers"])
    cat.write(txn)
