"""Signatures and audits: the service's rules, the reader's own checks, detached files, the CLI.

A real service on loopback (SQLite) holds nlp/web@1, a tiny dataset labeled by the fake
teacher. Team nlp owns it (alice and bob write, rita reads, adam admins), team vision may
read it (vic), team speech may not (sam). Signatures are checked twice: by the service
(key, owner, revocation) and by the reader, over manifest bytes it reads and hashes itself.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs `pip install 'labelgen[service]'`")
pytest.importorskip("cryptography", reason="needs `pip install 'labelgen[service]'`")

import sqlalchemy as sa  # noqa: E402

from labelgen.catalog import trust  # noqa: E402
from labelgen.catalog.client import CatalogClient, CatalogError  # noqa: E402
from labelgen.contract import signatures  # noqa: E402
from labelgen.service.app import ServiceSettings  # noqa: E402
from labelgen.service.server import ServiceThread  # noqa: E402

ADMIN = "lgt_" + "t" * 43
USERS = {
    "alice": ("nlp", "writer"),
    "bob": ("nlp", "writer"),
    "rita": ("nlp", "reader"),
    "adam": ("nlp", "admin"),
    "vic": ("vision", "reader"),
    "sam": ("speech", "writer"),
}


class Org:
    """The service, a client per user, and the dataset nlp/web@1 was published from."""

    def __init__(self, svc: ServiceThread, dataset: Path):
        self.svc, self.dataset = svc, dataset
        self.admin = CatalogClient(svc.address, token=ADMIN)
        self.tokens: dict[str, str] = {}
        self.c: dict[str, CatalogClient] = {}

    def add(self, user: str, team: str, role: str) -> None:
        self.admin.set_member(team, user, role)
        if user not in self.tokens:
            self.tokens[user] = self.admin.create_token(name="t", user=user)["token"]
            self.c[user] = CatalogClient(self.svc.address, token=self.tokens[user])

    def key(self, user: str, team: str = "nlp", name: str = "laptop") -> signatures.PrivateKey:
        key = signatures.new_key(name)
        self.c[user].register_key(team, key.public.hex, name)
        return key


@pytest.fixture
def org(fake_labels, tmp_path):
    dataset = tmp_path / "labels"
    shutil.copytree(fake_labels, dataset)
    settings = ServiceSettings(db_url=f"sqlite:///{tmp_path / 'catalog.sqlite'}", bootstrap_token=ADMIN)
    with ServiceThread(settings) as svc:
        o = Org(svc, dataset)
        for team in ("nlp", "vision", "speech"):
            o.admin.create_team(team)
        for user, (team, role) in USERS.items():
            o.add(user, team, role)
        o.admin.publish("nlp/web", str(dataset))
        o.admin.share("nlp/web", "vision")
        yield o
    svc.app.state.sessions.kw["bind"].dispose()


def flip_one_byte(manifest: Path) -> None:
    """Change one digit of the manifest's created_at: the same size, still valid JSON."""
    data = bytearray(manifest.read_bytes())
    at = data.index(b'"created_at": "') + len(b'"created_at": "')
    while not chr(data[at]).isdigit():
        at += 1
    data[at] = ord("1") if data[at] != ord("1") else ord("2")
    manifest.write_bytes(bytes(data))
    json.loads(data)


def refused(fn, status: int, *words: str) -> CatalogError:
    with pytest.raises(CatalogError) as info:
        fn()
    assert info.value.status == status, info.value
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    return info.value


# --------------------------------------------------------------------------- signatures


def test_a_signed_version_verifies_and_one_changed_byte_does_not(org):
    key = org.key("alice")
    done = trust.sign_version(org.c["alice"], "nlp/web@latest", key)
    assert done["ref"] == "nlp/web@1" and done["valid"] and done["signer"] == "alice"

    verdict = trust.check_version(org.c["rita"], "nlp/web@1")
    manifest = (org.dataset / "manifest.json").read_bytes()
    assert verdict.signed and verdict.manifest_sha256 == hashlib.sha256(manifest).hexdigest()
    assert [s["valid"] for s in verdict.signatures] == [True] and verdict.signatures[0]["name"] == "laptop"
    assert "signed" not in verdict.problems
    assert trust.check_version(org.c["vic"], "nlp/web@1").signed  # readers of a shared dataset too
    assert trust.check_version(org.c["rita"], "nlp/web", keys=[key.public]).signed  # a pinned key
    other = signatures.new_key().public
    pinned = trust.check_version(org.c["rita"], "nlp/web@1", keys=[other])
    assert not pinned.signed and "not one of the keys given" in pinned.signatures[0]["reason"]

    view = org.c["rita"].version("nlp/web@1")
    assert view["trust"] == {"signed": True, "audited": False, "signatures": 1, "audits": 0}
    (row,) = org.c["rita"].list_datasets()
    assert row["trust"]["signed"] and row["latest"]["trust"]["signatures"] == 1
    assert org.c["rita"].dataset("nlp/web")["versions"][0]["trust"]["signed"]

    # The same manifest with one byte changed, published as version 2: the signature of
    # version 1 does not verify over it.
    copy = org.dataset.parent / "labels-2"
    shutil.copytree(org.dataset, copy)
    flip_one_byte(copy / "manifest.json")
    v2 = org.admin.publish("nlp/web", str(copy))
    assert v2["version"] == 2 and v2["manifest_sha256"] != view["manifest_sha256"]
    refused(
        lambda: org.c["alice"].sign_version("nlp/web@2", key.key_id, done["signature"]),
        400,
        "does not verify",
        "nlp/web@2",
    )
    assert not trust.check_version(org.c["rita"], "nlp/web@2").signed

    # Version 1's manifest changed in storage after it was signed: the reader's own hash
    # no longer matches, so neither its signature nor a fresh one counts.
    flip_one_byte(org.dataset / "manifest.json")
    changed = trust.check_version(org.c["rita"], "nlp/web@1")
    assert not changed.signed and "storage changed after publish" in changed.problems["signed"]
    assert org.c["rita"].trust("nlp/web@1")["signed"]  # the catalog alone cannot see it
    with pytest.raises(trust.TrustRefused, match="not signing nlp/web@1"):
        trust.sign_version(org.c["bob"], "nlp/web@1", org.key("bob"))


def test_a_detached_signature_on_a_plain_url(org, tmp_path):
    url = str(tmp_path / "plain")
    shutil.copytree(org.dataset, url)
    key = signatures.new_key("ci")
    path, detached = trust.sign_url(url, key)
    assert path.endswith(f"_signatures/{key.key_id}.json") and Path(path).exists()
    assert json.loads(Path(path).read_text())["manifest_sha256"] == detached.manifest_sha256

    assert trust.check_url(url, keys=[key.public]).signed
    unpinned = trust.check_url(url)
    assert not unpinned.signed and "is not one you gave" in unpinned.problems["signed"]
    assert not unpinned.audited and "catalog only" in unpinned.problems["audited"]
    assert not trust.check_url(url, keys=[signatures.new_key().public]).signed

    flip_one_byte(Path(url) / "manifest.json")
    changed = trust.check_url(url, keys=[key.public])
    assert not changed.signed and "hashes to" in changed.signatures[0]["reason"]

    # A signature file forged to name the new hash does not verify either.
    forged = {**detached.to_json(), "manifest_sha256": changed.manifest_sha256}
    Path(path).write_text(json.dumps(forged))
    forged_verdict = trust.check_url(url, keys=[key.public])
    assert not forged_verdict.signed and "does not verify" in forged_verdict.signatures[0]["reason"]
    with pytest.raises(ValueError, match="catalog version"):
        trust.sign_url(f"labelgen://{org.svc.address}/nlp/web@1", key)


def test_a_revoked_key_or_a_signer_who_left_the_team_no_longer_counts(org):
    alice, bob = org.key("alice"), org.key("bob")
    trust.sign_version(org.c["alice"], "nlp/web@1", alice)
    trust.sign_version(org.c["bob"], "nlp/web@1", bob)
    assert trust.check_version(org.c["rita"], "nlp/web@1").signed

    refused(lambda: org.c["rita"].revoke_key("nlp", alice.key_id), 403, "only its owner alice")
    refused(lambda: org.c["sam"].revoke_key("nlp", alice.key_id), 403)
    revoked = org.c["alice"].revoke_key("nlp", alice.key_id)
    assert revoked["revoked_by"] == "alice" and revoked["revoked_at"]
    org.admin.remove_member("nlp", "bob")  # bob leaves the team: his signature goes with him

    view = org.c["rita"].trust("nlp/web@1")
    assert not view["signed"]
    reasons = {s["key_id"]: s["reason"] for s in view["signatures"]}
    assert "was revoked by alice" in reasons[alice.key_id]
    assert "bob is no longer a writer or admin of team nlp" in reasons[bob.key_id]
    verdict = trust.check_version(org.c["rita"], "nlp/web@1")
    assert not verdict.signed and "2 signature(s), none valid" in verdict.problems["signed"]
    refused(lambda: trust.sign_version(org.c["alice"], "nlp/web@1", alice), 409, "revoked")

    org.add("bob", "nlp", "writer")  # back in the team: his signature counts again
    assert trust.check_version(org.c["rita"], "nlp/web@1").signed
    org.admin.set_member("nlp", "bob", "reader")  # a reader's signature does not
    assert not trust.check_version(org.c["rita"], "nlp/web@1").signed
    org.c["adam"].revoke_key("nlp", bob.key_id)  # team admins revoke anyone's key
    keys = {k["key_id"]: k for k in org.c["rita"].list_keys("nlp")}
    assert keys[bob.key_id]["revoked_by"] == "adam"


def test_a_signature_by_another_teams_key_is_refused(org):
    org.add("alice", "speech", "writer")
    speech_key = org.key("alice", team="speech")
    refused(
        lambda: trust.sign_version(org.c["alice"], "nlp/web@1", speech_key),
        403,
        "not a key of team nlp",
    )
    sam_key = org.key("sam", team="speech")
    digest = org.admin.version("nlp/web@1")["manifest_sha256"]
    refused(lambda: trust.sign_version(org.c["sam"], "nlp/web@1", sam_key), 403, "sam may not read")
    sam_signature = signatures.sign_digest(sam_key, digest)
    refused(
        lambda: org.c["sam"].sign_version("nlp/web@1", sam_key.key_id, sam_signature), 403, "sam may not sign"
    )
    alice = org.key("alice")
    signature = signatures.sign_digest(alice, digest)
    refused(lambda: org.c["bob"].sign_version("nlp/web@1", alice.key_id, signature), 403, "alice's")
    assert not org.c["rita"].trust("nlp/web@1")["signatures"]


# --------------------------------------------------------------------------- attestations


REPORT = {
    "passed": True,
    "url": "labelgen://x/nlp/web@1",
    "ref": "nlp/web@1",
    "rows": 8,
    "positions": 1000,
    "seed": 0,
    "reference": "vllm",
    "teacher": "tiny",
    "dtype": "float32",
    "tolerance": {"topk_logprob": 0.01},
    "worst": {"topk_logprob": 0.001, "target_logprob": 0.002, "hidden": None},
    "first_failure": None,
    "checks": {"integrity": {"passed": True, "detail": "all files"}},
    "summary": "8 rows re-scored: passed",
    "sampled": [{"row": 1}],
}


def test_an_outside_auditors_attestation_is_shown_but_not_trusted(org):
    shown = org.c["vic"].attest("nlp/web@1", REPORT)
    assert shown["auditor"] == "vic" and shown["passed"] and not shown["trusted"]
    view = org.c["rita"].trust("nlp/web@1")
    assert not view["audited"] and [a["auditor"] for a in view["attestations"]] == ["vic"]
    verdict = trust.check_version(org.c["rita"], "nlp/web@1")
    assert not verdict.audited and "vic, who are not members of team nlp" in verdict.problems["audited"]

    failure = {"check": "topk", "shard": "shards/part-00000-00000.parquet", "row": 3, "position": 17}
    failed = {**REPORT, "passed": False, "first_failure": {**failure, "reason": "logprob off by 0.4"}}
    assert org.c["rita"].attest("nlp/web@1", failed)["trusted"]
    verdict = trust.check_version(org.c["vic"], "nlp/web@1")
    assert not verdict.audited
    problem = verdict.problems["audited"]
    assert (
        "the newest audit by rita" in problem and "failed at shard shards/part-00000-00000.parquet" in problem
    )
    assert "row 3, position 17" in problem and "logprob off by 0.4" in problem

    org.admin.attest("nlp/web@1", REPORT)  # an organisation admin's audit is trusted
    verdict = trust.check_version(org.c["vic"], "nlp/web@1")
    assert verdict.audited and [a["auditor"] for a in verdict.attestations] == ["admin", "rita", "vic"]
    summary = org.c["rita"].version("nlp/web@1")["trust"]
    assert summary == {"signed": False, "audited": True, "signatures": 0, "audits": 3}

    with org.svc.app.state.sessions() as session:  # the sampled rows are not stored
        stored = session.execute(sa.text("SELECT report FROM attestations")).scalars().all()
    assert all("sampled" not in json.loads(r) for r in stored)
    refused(lambda: org.c["rita"].attest("nlp/web@1", {**REPORT, "passed": "yes"}), 400, "'passed'")
    refused(lambda: org.c["rita"].attest("nlp/web@1", {**REPORT, "rows": -1}), 400, "'rows'")
    refused(lambda: org.c["rita"].attest("nlp/web@1", {**REPORT, "summary": "x" * 70_000}), 413)
    refused(lambda: org.c["sam"].attest("nlp/web@1", REPORT), 403)


def test_require_trusted_names_the_version_and_what_is_missing(org, monkeypatch):
    monkeypatch.setenv("LABELGEN_TOKEN", org.tokens["rita"])
    url = f"labelgen://{org.svc.address}/nlp/web"  # @latest: checked as the version it reads
    with pytest.raises(trust.TrustRefused) as info:
        trust.require_trusted(url, ["signed"])
    assert str(info.value) == (
        "nlp/web@1 has no valid signature: no signatures (sign it with `labelgen sign nlp/web@1 --key KEY`)"
    )
    trust.sign_version(org.c["alice"], "nlp/web@1", org.key("alice"))
    assert trust.require_trusted(url, ["signed"]).signed
    with pytest.raises(trust.TrustRefused, match=r"^nlp/web@1 has no passing audit by its team: no audits"):
        trust.require_trusted(url, ("signed", "audited"))
    org.c["adam"].attest("nlp/web@1", REPORT)
    verdict = trust.require_trusted(url, ("signed", "audited"))
    assert verdict.signed and verdict.audited and verdict.ref == "nlp/web@1"

    with pytest.raises(trust.TrustRefused, match="not a catalog version"):
        trust.require_trusted(str(org.dataset), ["signed"])
    assert not trust.require_trusted(str(org.dataset), []).signed  # nothing required: nothing refused
    with pytest.raises(ValueError, match="the requirements are signed, audited"):
        trust.require_trusted(url, ["reviewed"])
    monkeypatch.setenv("LABELGEN_TOKEN", org.tokens["sam"])  # may not read it: cannot be checked
    with pytest.raises(trust.TrustRefused, match="cannot check"):
        trust.require_trusted(f"labelgen://{org.svc.address}/nlp/web@1", ["signed"])


# --------------------------------------------------------------------------- access and the API


def test_access_rules_for_keys_and_trust(org):
    key = signatures.new_key()
    refused(lambda: org.c["rita"].register_key("nlp", key.public.hex, "k"), 403, "writer role")
    refused(lambda: org.c["vic"].register_key("nlp", key.public.hex, "k"), 403)
    refused(lambda: org.c["alice"].register_key("nlp", "ab" * 16 + "zz", "k"), 400, "hex")
    registered = org.c["alice"].register_key("nlp", key.public.hex, "k")
    assert registered["key_id"] == key.key_id and registered["owner"] == "alice"
    refused(lambda: org.c["bob"].register_key("nlp", key.public.hex, "k"), 409, "already registered")

    refused(lambda: org.c["sam"].trust("nlp/web@1"), 403, "nlp/web")  # outsiders see nothing
    refused(lambda: org.c["sam"].list_keys("nlp"), 403)
    refused(lambda: org.c["vic"].list_keys("nlp"), 403)  # a shared dataset's readers see its
    assert org.c["vic"].trust("nlp/web@1")["keys"] == []  # signers' keys, not the team's list
    assert [k["key_id"] for k in org.c["rita"].list_keys("nlp")] == [key.key_id]
    refused(lambda: CatalogClient(org.svc.address, token="").trust("nlp/web@1"), 401)

    signature = signatures.sign_digest(key, org.c["alice"].version("nlp/web@1")["manifest_sha256"])
    refused(lambda: org.c["alice"].sign_version("nlp/web@1", key.key_id, "00" * 64), 400, "does not verify")
    refused(lambda: org.c["alice"].sign_version("nlp/web@1", key.key_id, "xyz"), 400)
    refused(lambda: org.c["alice"].sign_version("nlp/web@1", "0" * 16, signature), 404, "not registered")
    org.c["alice"].sign_version("nlp/web@1", key.key_id, signature)
    refused(lambda: org.c["alice"].sign_version("nlp/web@1", key.key_id, signature), 409, "already signed")
    assert [k["key_id"] for k in org.c["vic"].trust("nlp/web@1")["keys"]] == [key.key_id]

    actions = {e["action"] for e in org.admin.audit(limit=1000) if e["outcome"] == "ok"}
    assert {"key.register", "sign"} <= actions
    refusals = [e for e in org.admin.audit(limit=1000) if e["outcome"] == "refused" and e["action"] == "sign"]
    assert len(refusals) == 4


def test_listing_datasets_looks_up_trust_once_for_all_rows(org):
    key = org.key("alice")
    for name in ("a", "b", "c"):
        copy = org.dataset.parent / f"labels-{name}"
        shutil.copytree(org.dataset, copy)
        org.c["alice"].publish(f"nlp/{name}", str(copy))
        trust.sign_version(org.c["alice"], f"nlp/{name}@1", key)
    engine = org.svc.app.state.sessions.kw["bind"]
    statements: list[str] = []

    def seen(conn, cursor, statement, *args):
        statements.append(statement)

    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        rows = org.c["rita"].list_datasets()
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)
    assert [r["trust"]["signed"] for r in rows] == [True, True, True, False]  # nlp/a, b, c, web
    assert sum("FROM signatures" in s for s in statements) == 1
    assert sum("FROM attestations" in s for s in statements) == 1


# --------------------------------------------------------------------------- the command line


def test_keys_sign_and_verify_on_the_command_line(org, tmp_path, monkeypatch, capsys):
    from labelgen.cli import main

    monkeypatch.setenv("LABELGEN_SERVICE", org.svc.address)
    monkeypatch.setenv("LABELGEN_TOKEN", org.tokens["alice"])
    monkeypatch.setenv("LABELGEN_CONFIG_DIR", str(tmp_path / "cfg"))
    key = tmp_path / "keys" / "laptop"
    assert main(["keys", "new", "--out", str(key)]) == 0
    assert (key.stat().st_mode & 0o777) == 0o600 and Path(f"{key}.pub").exists()
    assert main(["keys", "new", "--out", str(key)]) == 2  # never overwritten
    assert "never overwritten" in capsys.readouterr().err
    assert main(["keys", "register", "nlp", f"{key}.pub"]) == 0
    key_id = signatures.load_public_key(f"{key}.pub").key_id
    assert main(["keys", "list", "nlp"]) == 0
    assert key_id in capsys.readouterr().out

    assert main(["verify", "nlp/web@1"]) == 1
    assert "has no valid signature: no signatures" in capsys.readouterr().out
    assert main(["sign", "nlp/web@1", "--key", str(key)]) == 0
    assert main(["verify", "nlp/web@1"]) == 0
    out = capsys.readouterr().out
    assert f"signature by alice (key {key_id} 'laptop'" in out and "verdict: OK" in out
    assert main(["verify", "nlp/web@1", "--require", "signed,audited"]) == 1
    assert "audited: no (nlp/web@1 has no passing audit by its team" in capsys.readouterr().out
    assert main(["verify", "nlp/web@1", "--key", f"{key}.pub", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["signed"] is True
    assert main(["verify", "nlp/web@7"]) == 2  # no such version: refused, not "not signed"
    assert main(["verify", "nlp/web@1", "--require", "reviewed"]) == 2
    assert main(["datasets", "list"]) == 0
    assert "TRUST" in (listing := capsys.readouterr().out) and "signed" in listing
    assert main(["datasets", "show", "nlp/web@1"]) == 0
    assert "signature by alice" in capsys.readouterr().out

    plain = tmp_path / "plain"
    shutil.copytree(org.dataset, plain)
    assert main(["sign", str(plain), "--key", str(key)]) == 0
    assert (plain / "_signatures" / f"{key_id}.json").exists()
    assert main(["verify", str(plain), "--key", f"{key}.pub"]) == 0
    assert main(["verify", str(plain)]) == 1  # whose key it is, the reader says
    flip_one_byte(plain / "manifest.json")
    assert main(["verify", str(plain), "--key", f"{key}.pub"]) == 1

    assert main(["keys", "revoke", "nlp", key_id]) == 0
    assert main(["verify", "nlp/web@1"]) == 1
    assert "was revoked" in capsys.readouterr().out
