"""Session checkpoints (SQLite file by default, Postgres by URL) and the long-term store, opened from settings."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.store.base import BaseStore

from robopt.errors import MissingExtraError
from robopt.settings import Settings


@dataclass
class Persistence:
    """The two halves of robopt's memory: per-session checkpoints and the cross-session store."""

    checkpointer: BaseCheckpointSaver
    store: BaseStore


@contextmanager
def open_persistence(settings: Settings) -> Iterator[Persistence]:
    """Open the checkpointer and store named by the settings; closes them on exit."""
    path = settings.sqlite_path
    if path is not None:
        from langgraph.checkpoint.sqlite import SqliteSaver
        from langgraph.store.sqlite import SqliteStore

        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection each: the saver and the store run their own transactions, from different threads.
        saver_conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        store_conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
        saver_conn.execute("PRAGMA journal_mode=WAL")
        try:
            saver = SqliteSaver(saver_conn)
            saver.setup()
            store = SqliteStore(store_conn)
            store.setup()
            yield Persistence(saver, store)
        finally:
            saver_conn.close()
            store_conn.close()
        return
    url = settings.database_url or ""
    if not url.startswith(("postgres://", "postgresql://")):
        from robopt.errors import InvalidCriteriaError

        raise InvalidCriteriaError(
            f"unsupported database URL {url!r}", "use sqlite:///path/to/file.db or postgresql://user@host/db"
        )
    try:
        from langgraph.checkpoint.postgres import PostgresSaver
        from langgraph.store.postgres import PostgresStore
    except ImportError:
        raise MissingExtraError("a Postgres database URL", "postgres", "langgraph-checkpoint-postgres") from None
    with PostgresSaver.from_conn_string(url) as saver, PostgresStore.from_conn_string(url) as store:
        saver.setup()
        store.setup()
        yield Persistence(saver, store)
