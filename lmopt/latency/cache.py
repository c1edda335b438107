"""A persistent latency cache: (structural signature, backend cache_key) -> milliseconds.

The same file keeps candidate importance scores (table `scores`, keyed by model, calibration data
and candidate) and each candidate block's signature (table `block_signatures`), so that a warm
`lmopt optimize` neither rebuilds, re-times nor re-scores anything.

One sqlite file (stdlib sqlite3), by default $LMOPT_CACHE_DIR/latency.sqlite, else
$XDG_CACHE_HOME/lmopt/latency.sqlite, else ~/.cache/lmopt/latency.sqlite. Every measurement
is committed as soon as it is stored, so an interrupted profiling run keeps what it timed.
Several processes may share the file: sqlite locks it, and writers wait up to `timeout` s.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LmoptError, one_line

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11; lmopt supports 3.10

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """$LMOPT_CACHE_DIR, else $XDG_CACHE_HOME/lmopt, else ~/.cache/lmopt."""
    if os.environ.get("LMOPT_CACHE_DIR"):
        return Path(os.environ["LMOPT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmopt"


def default_cache_path() -> Path:
    """The latency cache file in default_cache_dir()."""
    return default_cache_dir() / "latency.sqlite"


def _is_sqlite_file(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(16) == b"SQLite format 3\x00"


def key_text(cache_key: dict) -> str:
    """The canonical text of a backend's cache_key()."""
    return json.dumps(cache_key, sort_keys=True, separators=(",", ":"))


class LatencyCache:
    """Persistent (signature, backend key) -> ms store. Use as a context manager or call close()."""

    def __init__(self, path: str | os.PathLike | None = None, timeout: float = 60.0) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self._db = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._open(timeout)
            except sqlite3.DatabaseError as exc:  # a damaged sqlite file: keep it aside, start afresh
                self.close()
                if not _is_sqlite_file(self.path):
                    raise  # someone else's file: refused below, never moved
                aside = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(self.path, aside)
                logger.warning("the latency cache %s was damaged (%s); moved it to %s and started a new one",
                               self.path, one_line(exc), aside)
                self._open(timeout)
        except sqlite3.DatabaseError as exc:
            raise LmoptError(f"{self.path}: not a usable latency cache ({exc}); delete it or set "
                             "LMOPT_CACHE_DIR to another folder") from None
        except OSError as exc:
            raise LmoptError(f"{self.path}: cannot use the latency cache ({exc.strerror}); delete it or set "
                             "LMOPT_CACHE_DIR to another folder, or pass --no-cache") from None

    def _open(self, timeout: float) -> None:
        # isolation_level=None: autocommit, every INSERT is durable when execute() returns.
        self._db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
        # Damage inside the file only shows when a damaged page is read: check it all now.
        check = self._db.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise sqlite3.DatabaseError("database disk image is malformed")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS latency ("
            " signature TEXT NOT NULL, backend TEXT NOT NULL, ms REAL NOT NULL, created REAL NOT NULL,"
            " PRIMARY KEY (signature, backend))")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS scores ("
            " key TEXT PRIMARY KEY, value REAL NOT NULL, created REAL NOT NULL)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS block_signatures ("
            " key TEXT PRIMARY KEY, signature TEXT NOT NULL, created REAL NOT NULL)")

    def get(self, signature: str, cache_key: dict) -> float | None:
        row = self._db.execute("SELECT ms FROM latency WHERE signature = ? AND backend = ?",
                               (signature, key_text(cache_key))).fetchone()
        return None if row is None else float(row[0])

    def put(self, signature: str, cache_key: dict, ms: float) -> None:
        """Store one measurement, committed at once."""
        self._db.execute("INSERT OR REPLACE INTO latency (signature, backend, ms, created) VALUES (?, ?, ?, ?)",
                         (signature, key_text(cache_key), float(ms), time.time()))

    def get_score(self, key: str) -> float | None:
        row = self._db.execute("SELECT value FROM scores WHERE key = ?", (key,)).fetchone()
        return None if row is None else float(row[0])

    def put_score(self, key: str, value: float) -> None:
        """Store one importance score, committed at once."""
        self._db.execute("INSERT OR REPLACE INTO scores (key, value, created) VALUES (?, ?, ?)",
                         (key, float(value), time.time()))

    def get_signature(self, key: str) -> str | None:
        """The structural signature of a candidate block (key: model fingerprint + candidate)."""
        row = self._db.execute("SELECT signature FROM block_signatures WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def put_signature(self, key: str, signature: str) -> None:
        """Store a candidate block's structural signature, committed at once."""
        self._db.execute("INSERT OR REPLACE INTO block_signatures (key, signature, created) VALUES (?, ?, ?)",
                         (key, signature, time.time()))

    def entries(self, cache_key: dict | None = None) -> dict[str, float]:
        """signature -> ms for one backend key (all keys' rows if None; later keys win)."""
        if cache_key is None:
            rows = self._db.execute("SELECT signature, ms FROM latency ORDER BY created")
        else:
            rows = self._db.execute("SELECT signature, ms FROM latency WHERE backend = ?", (key_text(cache_key),))
        return {sig: float(ms) for sig, ms in rows}

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM latency").fetchone()[0])

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
