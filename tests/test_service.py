"""The catalog service over real HTTP on loopback, on SQLite and on a real PostgreSQL server.

Every test here runs twice: on the embedded SQLite default and on PostgreSQL (a fresh
database per test on the server ``.ci/run`` starts; the PostgreSQL half is an
integration test). Requests go through uvicorn on 127.0.0.1 with the standard library's
HTTP client, so status codes and JSON bodies are the ones a user gets.
"""

from __future__ import annotations

import http.client
import json
import logging
import shutil
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs `pip install 'labelgen[service]'`")
pytest.importorskip("sqlalchemy", reason="needs `pip install 'labelgen[service]'`")

import sqlalchemy as sa  # noqa: E402

from labelgen.service import locations  # noqa: E402
from labelgen.service.app import ServiceSettings  # noqa: E402
from labelgen.service.server import ServiceThread  # noqa: E402

KEY = "test-signing-key"
ADMIN = "lgt_" + "a" * 43


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def service(db_url):
    settings = ServiceSettings(db_url=db_url, signing_key=KEY, bootstrap_token=ADMIN)
    with ServiceThread(settings) as svc:
        yield svc
    svc.app.state.sessions.kw["bind"].dispose()


@pytest.fixture
def dataset(fake_labels, tmp_path) -> str:
    out = tmp_path / "labels"
    shutil.copytree(fake_labels, out)
    return str(out)


def call(svc, method: str, path: str, token: str | None = None, body=None, raw: bytes | None = None):
    """(status, parsed JSON or raw bytes) of one request to the service."""
    host, port = svc.address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(payload)
    except ValueError:
        return resp.status, payload


def token_for(svc, user: str) -> str:
    status, out = call(svc, "POST", "/v1/tokens", ADMIN, {"name": "t", "user": user})
    assert status == 201, out
    return out["token"]


def setup_org(svc, dataset: str) -> dict[str, str]:
    """Teams nlp (owner of nlp/web), vision (it is shared with), speech (unrelated), audio
    (no members); a user per (team, role); nlp/web@1 published by the admin."""
    tokens = {}
    for team in ("nlp", "vision", "speech", "audio"):
        assert call(svc, "POST", "/v1/teams", ADMIN, {"name": team})[0] == 201
    for team, relation in (("nlp", "own"), ("vision", "shared"), ("speech", "other")):
        for role in ("reader", "writer", "admin"):
            user = f"{relation}-{role}"
            status, out = call(svc, "PUT", f"/v1/teams/{team}/members/{user}", ADMIN, {"role": role})
            assert status == 200, out
            tokens[user] = token_for(svc, user)
    status, out = call(svc, "POST", "/v1/datasets/nlp/web/versions", ADMIN, {"url": dataset})
    assert status == 201, out
    assert call(svc, "PUT", "/v1/datasets/nlp/web/shares/vision", ADMIN)[0] == 200
    return tokens


def attempt(svc, action: str, token: str | None, dataset: str) -> int:
    if action == "read":
        return call(svc, "GET", "/v1/datasets/nlp/web/versions/1/files", token)[0]
    if action == "publish":  # a fresh copy each time: the same URL again is the same version
        copy = f"{dataset}-{uuid.uuid4().hex[:8]}"
        shutil.copytree(dataset, copy)
        return call(svc, "POST", "/v1/datasets/nlp/web/versions", token, {"url": copy})[0]
    if action == "alias":
        return call(svc, "PUT", "/v1/datasets/nlp/web/aliases/stable", token, {"version": 1})[0]
    status = call(svc, "PUT", "/v1/datasets/nlp/web/shares/audio", token)[0]
    if status == 200:  # leave the sharing as it was
        assert call(svc, "DELETE", "/v1/datasets/nlp/web/shares/audio", token)[0] == 200
    return status


# The documented matrix (docs/SERVICE.md, labelgen/service/access.py): relation → role → action → status.
EXPECTED = {
    "own": {
        "reader": {"read": 200, "publish": 403, "alias": 403, "grant": 403},
        "writer": {"read": 200, "publish": 201, "alias": 200, "grant": 403},
        "admin": {"read": 200, "publish": 201, "alias": 200, "grant": 200},
    },
    "shared": {
        role: {"read": 200, "publish": 403, "alias": 403, "grant": 403}
        for role in ("reader", "writer", "admin")
    },
    "other": {
        role: {"read": 403, "publish": 403, "alias": 403, "grant": 403}
        for role in ("reader", "writer", "admin")
    },
}


def test_access_matrix_and_every_refusal_is_audited(service, dataset):
    tokens = setup_org(service, dataset)
    seen, refused = {}, 0
    for relation, roles in EXPECTED.items():
        for role, actions in roles.items():
            for action in actions:
                status = attempt(service, action, tokens[f"{relation}-{role}"], dataset)
                seen[(relation, role, action)] = status
                refused += status >= 400
    for action in ("read", "publish", "alias", "grant"):
        status = attempt(service, action, None, dataset)
        assert status == 401, (action, status)
        refused += 1
    want = {
        (rel, role, a): s
        for rel, roles in EXPECTED.items()
        for role, acts in roles.items()
        for a, s in acts.items()
    }
    assert seen == want
    status, log = call(service, "GET", "/v1/audit?limit=10000", ADMIN)
    assert status == 200
    events = log["events"]
    assert sum(e["outcome"] == "refused" for e in events) == refused
    assert {"publish", "share.grant", "share.revoke", "alias.move", "read", "token.create", "member.set"} <= {
        e["action"] for e in events if e["outcome"] == "ok"
    }
    forbidden = next(e for e in events if e["status"] == 403 and e["actor"] == "other-reader")
    assert "nlp/web" in forbidden["detail"]["reason"]


def test_a_403_names_the_dataset_and_who_can_grant_it(service, dataset):
    tokens = setup_org(service, dataset)
    assert call(service, "PUT", "/v1/teams/nlp/members/carol", ADMIN, {"role": "admin"})[0] == 200
    status, out = call(service, "GET", "/v1/datasets/nlp/web/versions/1", tokens["other-reader"])
    assert status == 403
    message = out["error"]["message"]
    assert (
        "nlp/web" in message and "own-admin" in message and "carol" in message and "labelgen share" in message
    )


def test_tokens_revoked_or_expired_stop_at_once(service, dataset):
    setup_org(service, dataset)
    token = token_for(service, "own-reader")
    assert call(service, "GET", "/v1/whoami", token)[0] == 200
    status, listed = call(service, "GET", "/v1/tokens", token)
    (mine,) = [t for t in listed["tokens"] if token.startswith(t["prefix"])]
    assert "token" not in mine  # listed by prefix, never the token itself
    assert call(service, "DELETE", f"/v1/tokens/{mine['id']}", token)[0] == 200
    status, out = call(service, "GET", "/v1/whoami", token)
    assert status == 401 and out["error"]["code"] == "revoked_token"
    status, short = call(service, "POST", "/v1/tokens", ADMIN, {"name": "short", "expires_days": 1e-6})
    assert status == 201
    time.sleep(0.3)
    status, out = call(service, "GET", "/v1/whoami", short["token"])
    assert status == 401 and out["error"]["code"] == "expired_token"
    assert call(service, "GET", "/v1/whoami", "lgt_" + "b" * 43)[0] == 401
    assert call(service, "GET", "/health")[0] == 200  # the one call without a token


def test_versions_are_immutable_aliases_move_and_lineage_is_kept(service, dataset):
    setup_org(service, dataset)
    copy = dataset + "-2"  # the same bytes at another URL: a new version
    shutil.copytree(dataset, copy)
    status, v2 = call(
        service, "POST", "/v1/datasets/nlp/web/versions", ADMIN, {"url": copy, "aliases": ["stable"]}
    )
    assert status == 201 and v2["version"] == 2 and sorted(v2["aliases"]) == ["latest", "stable"]
    assert call(service, "PUT", "/v1/datasets/nlp/web/aliases/stable", ADMIN, {"version": 1})[0] == 200
    status, stable = call(service, "GET", "/v1/datasets/nlp/web/versions/stable", ADMIN)
    assert stable["version"] == 1 and stable["manifest_sha256"] == v2["manifest_sha256"]
    assert stable["job_spec"] and "teacher" in stable["job_spec"]  # the spec that made it
    status, run = call(
        service, "POST", "/v1/runs", ADMIN, {"ref": "nlp/web@stable", "name": "kd-1", "config": {"lr": 1}}
    )
    assert status == 201 and run["ref"] == "nlp/web@1"
    assert [r["name"] for r in call(service, "GET", "/v1/datasets/nlp/web/versions/1", ADMIN)[1]["runs"]] == [
        "kd-1"
    ]
    assert call(service, "DELETE", "/v1/datasets/nlp/web/aliases/latest", ADMIN)[0] == 400
    status, out = call(service, "GET", "/v1/datasets/nlp/web/versions/9", ADMIN)
    assert status == 404 and "@1, @2" in out["error"]["message"]
    engine = sa.create_engine(service.settings.db_url)
    try:
        for statement in (
            "UPDATE versions SET url = '/elsewhere'",
            "DELETE FROM audit",
            "UPDATE audit SET actor = 'nobody'",
        ):
            with pytest.raises(sa.exc.DBAPIError, match="immutable|append-only"), engine.begin() as conn:
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()


def test_search_filters_and_card(service, dataset):
    setup_org(service, dataset)
    status, found = call(service, "GET", "/v1/datasets?team=nlp", ADMIN)
    (entry,) = found["datasets"]
    card = entry["latest"]["card"]
    manifest = json.loads((Path(dataset) / "manifest.json").read_text())
    assert card["k"] == manifest["labels"]["k"] if "labels" in manifest else card["k"]
    fp = card["tokenizer"]["fingerprint"]
    for query, hits in (
        (f"tokenizer={fp}", 1),
        ("tokenizer=" + "0" * 64, 0),
        (f"k={card['k']}", 1),
        (f"k={card['k'] + 1}", 0),
        (f"min_tokens={card['tokens']}", 1),
        (f"max_tokens={card['tokens'] - 1}", 0),
        ("products=draws", 0),
        ("name=we", 1),
    ):
        assert len(call(service, "GET", f"/v1/datasets?{query}", ADMIN)[1]["datasets"]) == hits, query
    tokens = setup_more = token_for(service, "other-reader")
    assert call(service, "GET", "/v1/datasets", setup_more)[1]["datasets"] == []  # not readable, not listed
    assert call(service, "PUT", "/v1/datasets/nlp/web/shares/*", ADMIN)[0] == 200
    assert len(call(service, "GET", "/v1/datasets", tokens)[1]["datasets"]) == 1  # org-wide


def test_bad_input_and_attacks_are_refused(service, dataset, caplog):
    caplog.set_level(logging.DEBUG)
    tokens = setup_org(service, dataset)
    writer = tokens["own-writer"]
    for url in (
        "http://example.com/x",
        "ftp://h/x",
        "file:relative",
        "relative/path",
        "/data/../etc",
        "s3://",
        "",
        "memory://x::s3://bucket/ds",
    ):
        status, out = call(service, "POST", "/v1/datasets/nlp/web/versions", writer, {"url": url})
        assert status == 400, (url, status, out)
    # A version's URL is shown to every reader: credentials in it are refused, not stored.
    for url in ("s3://AKIAKEY:hunter2@bucket/ds", "s3://bucket/ds?X-Amz-Signature=d0d0cafe"):
        status, out = call(service, "POST", "/v1/datasets/nlp/web/versions", writer, {"url": url})
        assert status == 400 and out["error"]["code"] == "credentials_in_url", (url, out)
        assert "hunter2" not in out["error"]["message"] and "d0d0cafe" not in out["error"]["message"]
    for path in (
        "/v1/datasets/nlp/..%2F..%2Fetc/versions/1",
        "/v1/datasets/nlp/../nlp/web",
        "/v1/datasets/" + "a" * 65 + "/web",
        "/v1/datasets/nlp/web/versions/" + "9" * 30,
        "/v1/datasets/nlp/WEB",
        "/v1/teams/nlp/members/" + "x" * 3000,
    ):
        status, out = call(service, "GET", path, writer)
        assert status in (400, 404, 405), (path, status)
        assert (
            status != 404
            or "does not exist" in out["error"]["message"]
            or "Not Found" in out["error"]["message"]
        )
    assert call(service, "GET", "/v1/datasets/" + "a" * 65 + "/web", writer)[0] == 400
    status, out = call(service, "POST", "/v1/teams", ADMIN, raw=b'{"name": "' + b"x" * (2 << 20) + b'"}')
    assert status == 413 and out["error"]["code"] == "too_large"
    status, out = call(service, "POST", "/v1/teams", ADMIN, raw=b"{not json")
    assert status == 400 and "malformed" in out["error"]["message"]
    # The byte-range route serves only the version's own files, from its own URL.
    status, files = call(service, "GET", "/v1/datasets/nlp/web/versions/1/files", writer)
    url = next(f["url"] for f in files["files"] if f["path"] == "manifest.json")
    path = url.split(service.address, 1)[1]
    assert call(service, "GET", path)[0] == 200
    assert call(service, "GET", path.replace("sig=", "sig=0"))[0] == 403
    for evil in ("../../etc/hostname", "/etc/hostname", "shards/missing.parquet"):
        exp = int(time.time()) + 60
        sig = locations.sign(KEY.encode(), 1, evil, exp, 1)
        status, _ = call(service, "GET", f"/v1/blobs/1/{evil}?exp={exp}&t=1&sig={sig}")
        assert status in (400, 404), (evil, status)
    exp = int(time.time()) - 1
    sig = locations.sign(KEY.encode(), 1, "manifest.json", exp, 1)
    assert (
        call(service, "GET", f"/v1/blobs/1/manifest.json?exp={exp}&t=1&sig={sig}")[1]["error"]["code"]
        == "expired_url"
    )
    # Tokens are never logged, nor stored: not in the log records, not in the audit log.
    status, log = call(service, "GET", "/v1/audit?limit=10000", ADMIN)
    text = json.dumps(log) + "\n".join(r.getMessage() for r in caplog.records)
    for token in [ADMIN, *tokens.values()]:
        assert token not in text
    refused = [e for e in log["events"] if e["outcome"] == "refused"]
    assert len(refused) >= 7 + 6 + 2 + 1 + 3 + 1


def test_publish_refuses_a_corrupt_dataset_naming_the_file(service, dataset):
    setup_org(service, dataset)
    manifest = json.loads((Path(dataset) / "manifest.json").read_text())
    shard = manifest["shards"][0]["path"]
    with open(Path(dataset) / shard, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    status, out = call(service, "POST", "/v1/datasets/nlp/web/versions", ADMIN, {"url": dataset})
    assert status == 422 and shard in out["error"]["message"]
    events = call(service, "GET", "/v1/audit?action=publish", ADMIN)[1]["events"]
    assert events[0]["outcome"] == "refused" and shard in events[0]["detail"]["reason"]


def test_the_schema_the_migrations_make_is_the_models(service):
    from labelgen.service.db import Base

    engine = sa.create_engine(service.settings.db_url)
    try:
        inspector = sa.inspect(engine)
        for table in Base.metadata.sorted_tables:
            columns = {c["name"] for c in inspector.get_columns(table.name)}
            assert columns == {c.name for c in table.columns}, table.name
    finally:
        engine.dispose()


def test_read_urls_die_with_their_token_and_access(service, dataset):
    tokens = setup_org(service, dataset)
    reader = token_for(service, "shared-reader")
    status, files = call(service, "GET", "/v1/datasets/nlp/web/versions/1/files", reader)
    assert status == 200 and files["expires_in"] > 0
    path = next(f["url"] for f in files["files"] if f["path"] == "manifest.json").split(service.address, 1)[1]
    assert call(service, "GET", path)[0] == 200
    assert call(service, "DELETE", "/v1/datasets/nlp/web/shares/vision", ADMIN)[0] == 200
    assert call(service, "GET", path)[0] == 403  # unshared: the URL it was given stops at once
    assert call(service, "PUT", "/v1/datasets/nlp/web/shares/vision", ADMIN)[0] == 200
    assert call(service, "GET", path)[0] == 200
    status, listed = call(service, "GET", "/v1/tokens", reader)
    mine = next(t for t in listed["tokens"] if reader.startswith(t["prefix"]))
    assert call(service, "DELETE", f"/v1/tokens/{mine['id']}", reader)[0] == 200
    assert call(service, "GET", path)[0] == 401  # revoked: so are the URLs issued to it
    assert tokens  # the other users are untouched
    assert call(service, "GET", "/v1/datasets/nlp/web/versions/1/files", tokens["shared-reader"])[0] == 200


def test_another_teams_storage_cannot_be_published_under_your_name(service, dataset, tmp_path):
    tokens = setup_org(service, dataset)
    for url in (dataset, dataset + "/", str(Path(dataset).parent)):
        status, out = call(
            service, "POST", "/v1/datasets/speech/copy/versions", tokens["other-writer"], {"url": url}
        )
        assert (
            status == 403
            and out["error"]["code"] == "foreign_storage"
            and "nlp/web" in out["error"]["message"]
        )
    # A team it is shared with may read it, not re-publish it (a copy would survive unsharing).
    status, _ = call(
        service, "POST", "/v1/datasets/vision/copy/versions", tokens["shared-writer"], {"url": dataset}
    )
    assert status == 403
    # The owner's writers may: the same bytes again are the same version.
    status, again = call(
        service, "POST", "/v1/datasets/nlp/web/versions", tokens["own-writer"], {"url": dataset}
    )
    assert status == 200 and again["version"] == 1 and again["existing"]


def test_links_out_of_a_dataset_are_refused(service, dataset, tmp_path):
    setup_org(service, dataset)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for readers")
    linked = tmp_path / "linked"
    shutil.copytree(dataset, linked, symlinks=True)
    spec = linked / "job-spec.yaml"
    spec.unlink()
    spec.symlink_to(secret)
    status, out = call(service, "POST", "/v1/datasets/nlp/linked/versions", ADMIN, {"url": str(linked)})
    assert status in (403, 422) and "job-spec.yaml" in out["error"]["message"]


def test_tokens_never_outlive_their_maker_and_latest_only_moves_forward(service, dataset):
    setup_org(service, dataset)
    status, short = call(service, "POST", "/v1/tokens", ADMIN, {"name": "ci", "expires_days": 1})
    status, child = call(service, "POST", "/v1/tokens", short["token"], {"name": "forever"})
    assert status == 201 and child["expires_at"] == short["expires_at"]
    status, out = call(service, "PUT", "/v1/datasets/nlp/web/aliases/latest", ADMIN, {"version": 1})
    assert status == 400 and out["error"]["code"] == "latest_alias"
    status, found = call(service, "GET", "/v1/datasets?name=WE", ADMIN)  # names match case-insensitively
    assert len(found["datasets"]) == 1
    size = found["datasets"][0]["latest"]["bytes"]
    assert len(call(service, "GET", f"/v1/datasets?min_bytes={size + 1}", ADMIN)[1]["datasets"]) == 0
    assert len(call(service, "GET", f"/v1/datasets?max_bytes={size}", ADMIN)[1]["datasets"]) == 1


def test_a_streamed_body_over_the_cap_is_413(service):
    host, port = service.address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/v1/teams")
    conn.putheader("Authorization", f"Bearer {ADMIN}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    chunk = b"x" * (256 * 1024)
    try:
        for _ in range(8):
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the service may answer and close before the whole body is sent
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "too_large"
    conn.close()
