"""Where the job queue lives: `database.url`, read into a typed record (a SQLite file or a PostgreSQL server)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

SQLITE_PREFIX = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql", "postgres")
EXAMPLES = "sqlite:///data/wanbot.sqlite3 or postgresql://user:password@host:5432/dbname"


@dataclass(frozen=True)
class SqliteUrl:
    path: Path

    def shown(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class PostgresUrl:
    dsn: str

    def shown(self) -> str:
        """The URL without its password, for messages and logs."""
        parts = urlsplit(self.dsn)
        host = parts.hostname or ""
        netloc = f"{parts.username}@{host}" if parts.username else host
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


DatabaseUrl = SqliteUrl | PostgresUrl


def sqlite_url(path: Path) -> str:
    """The URL of a SQLite file: `sqlite:///relative/path` or `sqlite:////absolute/path`."""
    return SQLITE_PREFIX + str(path)


def parse_database_url(url: str) -> DatabaseUrl:
    """Read a `database.url`; a ValueError says what is wrong with it (never repeating a password)."""
    text = url.strip()
    if text.startswith(SQLITE_PREFIX):
        path = text.removeprefix(SQLITE_PREFIX)
        if not path or path.endswith("/"):
            raise ValueError(f"a SQLite URL names a file after {SQLITE_PREFIX}, such as {SQLITE_PREFIX}wanbot.sqlite3")
        return SqliteUrl(Path(path))
    scheme = text.partition(":")[0].lower()
    if scheme not in POSTGRES_SCHEMES:
        shown = f"'{scheme}'" if scheme and "://" in text else "none"
        raise ValueError(f"the scheme is {shown}; give {EXAMPLES}")
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 (reading it checks it)
    except ValueError:
        raise ValueError("the port of the PostgreSQL URL is not a number from 1 to 65535") from None
    if not parts.hostname:
        raise ValueError(f"the PostgreSQL URL names no host; give {EXAMPLES}")
    if parts.path.strip("/") == "":
        raise ValueError(f"the PostgreSQL URL names no database; give {EXAMPLES}")
    return PostgresUrl(text)
