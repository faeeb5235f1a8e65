"""The PostgreSQL test fixture (tests/pg_server.py): each test gets its own empty database."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_postgres_url_is_a_fresh_empty_database_sqlalchemy_can_use(postgres_url):
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from pg_server import fresh_database, server_url

    url = sqlalchemy.engine.make_url(postgres_url)
    assert url.drivername == "postgresql+psycopg"
    assert (
        url.database.startswith("labelgen_t_")
        and url.database != sqlalchemy.engine.make_url(server_url()).database
    )
    engine = sqlalchemy.create_engine(postgres_url)
    try:
        assert sqlalchemy.inspect(engine).get_table_names() == [], "the database starts empty"
        meta = sqlalchemy.MetaData()
        table = sqlalchemy.Table(
            "things",
            meta,
            sqlalchemy.Column("id", sqlalchemy.Integer, primary_key=True),
            sqlalchemy.Column("name", sqlalchemy.String(40), nullable=False),
        )
        meta.create_all(engine)
        with engine.begin() as conn:
            conn.execute(table.insert(), [{"name": "a"}, {"name": "b"}])
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.select(sqlalchemy.func.count()).select_from(table)).scalar() == 2
        assert sqlalchemy.inspect(engine).get_table_names() == ["things"]
    finally:
        engine.dispose()
    # Another database from the same server is empty too, and dropped on leaving, even
    # with a connection still open in it.
    with fresh_database(server_url()) as other:
        other_engine = sqlalchemy.create_engine(other)
        held = other_engine.connect()
        assert sqlalchemy.inspect(held).get_table_names() == []
    held.invalidate()
    other_engine.dispose()
    admin = sqlalchemy.create_engine(server_url())
    try:
        with admin.connect() as conn:
            left = conn.execute(
                sqlalchemy.text("SELECT datname FROM pg_database WHERE datname = :name"),
                {"name": sqlalchemy.engine.make_url(other).database},
            ).all()
        assert left == [], "fresh_database drops its database"
    finally:
        admin.dispose()
