"""The catalog's tables (SQLAlchemy 2, typed declarative) and its engine.

One schema for SQLite (the embedded default) and PostgreSQL. The schema is created and
changed only by the Alembic migrations in :mod:`labelgen.service.migrations` (applied
by :func:`open_catalog` at start); these classes mirror them, and a test checks the two
agree. Two tables are protected by the database itself: ``versions`` rows never change
(a version is immutable) and ``audit`` rows are never updated or deleted (the log is
append-only) — triggers refuse both, whatever client connects.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

try:
    import sqlalchemy as sa
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "the labelgen service needs SQLAlchemy and Alembic: pip install 'labelgen[service]'"
    ) from exc

__all__ = [
    "Base",
    "User",
    "Team",
    "Member",
    "Token",
    "Dataset",
    "Version",
    "Alias",
    "Share",
    "Run",
    "AuditEvent",
    "Setting",
    "SigningKey",
    "Signature",
    "Attestation",
    "RunMetric",
    "Job",
    "default_db_url",
    "describe_db",
    "open_catalog",
    "now",
    "iso",
]


def now() -> dt.datetime:
    """The current time, UTC, without tzinfo (stored the same way on both databases)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(default=False)  # organisation admin: creates teams, sees all
    created_at: Mapped[dt.datetime] = mapped_column(default=now)


class Team(Base):
    __tablename__ = "teams"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=now)


class Member(Base):
    __tablename__ = "members"
    team_id: Mapped[int] = mapped_column(sa.ForeignKey("teams.id"), primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), primary_key=True)
    role: Mapped[str] = mapped_column(sa.String(16))  # reader | writer | admin


class Token(Base):
    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(sa.String(64))
    token_hash: Mapped[str] = mapped_column(
        sa.String(64), unique=True
    )  # sha256 hex; the token is never stored
    prefix: Mapped[str] = mapped_column(sa.String(16))  # first characters, to tell tokens apart in lists
    created_at: Mapped[dt.datetime] = mapped_column(default=now)
    expires_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (sa.UniqueConstraint("team_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    team_id: Mapped[int] = mapped_column(sa.ForeignKey("teams.id"), index=True)
    name: Mapped[str] = mapped_column(sa.String(64))
    created_by: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=now)


class Version(Base):
    """An immutable version ``team/name@N``: where its bytes are and what they hash to."""

    __tablename__ = "versions"
    __table_args__ = (sa.UniqueConstraint("dataset_id", "number"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(sa.ForeignKey("datasets.id"), index=True)
    number: Mapped[int]
    url: Mapped[str] = mapped_column(sa.String(1024))
    manifest_sha256: Mapped[str] = mapped_column(sa.String(64))
    files: Mapped[str] = mapped_column(sa.Text)  # JSON: [{"path", "size", "sha256", "kind"}]
    card: Mapped[str] = mapped_column(sa.Text)  # JSON: the dataset card
    job_spec: Mapped[str | None] = mapped_column(sa.Text, default=None)
    # Search columns, copied from the card at publish.
    teacher: Mapped[str] = mapped_column(sa.String(1024), default="")
    tokenizer: Mapped[str] = mapped_column(sa.String(64), default="", index=True)
    k: Mapped[int] = mapped_column(default=0)
    products: Mapped[str] = mapped_column(sa.String(256), default="")  # comma-separated names
    tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    bytes: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    published_by: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=now)


class Alias(Base):
    __tablename__ = "aliases"
    dataset_id: Mapped[int] = mapped_column(sa.ForeignKey("datasets.id"), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(sa.ForeignKey("versions.id"))
    moved_by: Mapped[str] = mapped_column(sa.String(64))
    moved_at: Mapped[dt.datetime] = mapped_column(default=now)


class Share(Base):
    """Read access to a dataset for another team (``grantee`` its name) or the whole
    organisation (``grantee`` ``*``)."""

    __tablename__ = "shares"
    dataset_id: Mapped[int] = mapped_column(sa.ForeignKey("datasets.id"), primary_key=True)
    grantee: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    granted_by: Mapped[str] = mapped_column(sa.String(64))
    granted_at: Mapped[dt.datetime] = mapped_column(default=now)


class Run(Base):
    """A student run that trained from a version (lineage), as the trainer reported it."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(sa.ForeignKey("versions.id"), index=True)
    name: Mapped[str] = mapped_column(sa.String(256))
    user: Mapped[str] = mapped_column(sa.String(64))
    config: Mapped[str] = mapped_column(sa.Text, default="{}")
    created_at: Mapped[dt.datetime] = mapped_column(default=now)


class AuditEvent(Base):
    """One line of the append-only audit log: who did what to what, and how it ended."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=now, index=True)
    actor: Mapped[str | None] = mapped_column(sa.String(64), default=None)  # None: no valid token
    action: Mapped[str] = mapped_column(sa.String(32), index=True)
    target: Mapped[str] = mapped_column(sa.String(512), default="")
    team: Mapped[str | None] = mapped_column(sa.String(64), default=None, index=True)
    outcome: Mapped[str] = mapped_column(sa.String(16))  # ok | refused
    status: Mapped[int]
    detail: Mapped[str] = mapped_column(sa.Text, default="")


class Setting(Base):
    """Service-wide values kept in the catalog (the URL-signing key)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    value: Mapped[str] = mapped_column(sa.Text)


class SigningKey(Base):
    """A team's ed25519 public key: signatures made with it vouch for that team's versions
    while it is not revoked and its owner may still publish in the team."""

    __tablename__ = "signing_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    team_id: Mapped[int] = mapped_column(sa.ForeignKey("teams.id"), index=True)
    key_id: Mapped[str] = mapped_column(sa.String(16), unique=True)  # sha256(public key)[:16] hex
    public_key: Mapped[str] = mapped_column(sa.String(64))  # the raw 32-byte key, hex
    name: Mapped[str] = mapped_column(sa.String(64))
    owner: Mapped[str] = mapped_column(sa.String(64))  # the user who registered it (the signer)
    created_at: Mapped[dt.datetime] = mapped_column(default=now)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    revoked_by: Mapped[str | None] = mapped_column(sa.String(64), default=None)


class Signature(Base):
    """An ed25519 signature of a version's manifest sha256 (never changed once made)."""

    __tablename__ = "signatures"
    __table_args__ = (sa.UniqueConstraint("version_id", "key_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(sa.ForeignKey("versions.id"), index=True)
    key_id: Mapped[str] = mapped_column(sa.String(16))
    signature: Mapped[str] = mapped_column(sa.String(128))  # 64 bytes, hex
    signer: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=now)


class Attestation(Base):
    """The outcome of a ``labelgen audit`` of a version, posted by its auditor (never changed)."""

    __tablename__ = "attestations"
    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(sa.ForeignKey("versions.id"), index=True)
    auditor: Mapped[str] = mapped_column(sa.String(64))
    passed: Mapped[bool]
    rows: Mapped[int] = mapped_column(default=0)
    positions: Mapped[int] = mapped_column(default=0)
    report: Mapped[str] = mapped_column(sa.Text)  # JSON: the audit report (without sampled rows)
    created_at: Mapped[dt.datetime] = mapped_column(default=now)


class RunMetric(Base):
    """One step's metrics of a student run (loss terms, KL, top-1 agreement, lr, T)."""

    __tablename__ = "run_metrics"
    run_id: Mapped[int] = mapped_column(sa.ForeignKey("runs.id"), primary_key=True)
    step: Mapped[int] = mapped_column(primary_key=True)
    values: Mapped[str] = mapped_column(sa.Text)  # JSON object: name → number
    created_at: Mapped[dt.datetime] = mapped_column(default=now)


class Job(Base):
    """A labeling or generation job submitted through the service, from spec to version."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    team_id: Mapped[int] = mapped_column(sa.ForeignKey("teams.id"), index=True)
    dataset: Mapped[str] = mapped_column(sa.String(64))  # publish as team/dataset
    aliases: Mapped[str] = mapped_column(sa.String(256), default="")  # comma-separated
    spec: Mapped[str] = mapped_column(sa.Text)  # the job spec YAML, overrides applied
    output_url: Mapped[str] = mapped_column(sa.String(1024))
    submitter: Mapped[str] = mapped_column(sa.String(64))
    state: Mapped[str] = mapped_column(sa.String(16), index=True)
    # submitting | running | publishing | published | failed | stopped
    ray_job_id: Mapped[str | None] = mapped_column(sa.String(128), default=None)
    progress: Mapped[str | None] = mapped_column(sa.Text, default=None)  # JSON: _progress.json
    error: Mapped[str] = mapped_column(sa.Text, default="")
    version_number: Mapped[int | None] = mapped_column(default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=now)
    updated_at: Mapped[dt.datetime] = mapped_column(default=now)


def iso(value: dt.datetime | None) -> str | None:
    """A stored (naive UTC) time as ISO 8601 with its offset; None stays None."""
    return None if value is None else value.replace(tzinfo=dt.UTC).isoformat()


def default_db_url(data_dir: str | os.PathLike[str] | None = None) -> str:
    """The embedded default: a SQLite file under ``data_dir`` ($LABELGEN_DATA_DIR, else
    ``$XDG_DATA_HOME/labelgen``, else ``~/.local/share/labelgen``)."""
    base = data_dir or os.environ.get("LABELGEN_DATA_DIR")
    if not base:
        xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        base = str(Path(xdg) / "labelgen")
    Path(base).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(base).resolve() / 'catalog.sqlite'}"


def describe_db(url: str) -> str:
    """``url`` with its password hidden, for messages and logs."""
    return sa.engine.make_url(url).render_as_string(hide_password=True)


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit does not fsync; the file stays consistent
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def open_catalog(url: str, migrate: bool = True) -> sessionmaker[sa.orm.Session]:
    """An engine + session factory for the catalog at ``url``, migrated to the newest schema.

    Raises:
        ValueError: the URL names no database SQLAlchemy knows (with the accepted forms).
    """
    from labelgen.service.migrations import upgrade

    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ValueError(
            f"--db {url!r} is not a database URL; use sqlite:///PATH or "
            "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB"
        ) from exc
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(
            f"--db {parsed.render_as_string(hide_password=True)!r}: the catalog runs on SQLite or "
            "PostgreSQL; use sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB"
        )
    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = sa.create_engine(url, pool_size=16, max_overflow=16, pool_pre_ping=True)
    if migrate:
        upgrade(engine)
    return sessionmaker(engine, expire_on_commit=False)
