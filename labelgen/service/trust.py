"""Signing keys, signatures and attestations: the catalog operations of trust.

A team's writers register ed25519 public keys (:mod:`labelgen.contract.signatures`) and
sign versions of the team's datasets with them; anyone who may read a version may post
an audit report on it (an *attestation*). What counts, decided here and nowhere else:

- a signature is **valid** while it verifies over the version's manifest sha256, its key
  belongs to the owning team and is not revoked, and the key's owner is still a writer
  or admin of that team (or an organisation admin): revoking a key, or removing its
  owner from the team, withdraws every signature made with it;
- an attestation is **trusted** when its auditor is (still) a member of the owning team
  or an organisation admin; others' audits are shown, never counted;
- a version is **signed** when it has a valid signature and **audited** when its newest
  trusted attestation passed.

Signature and attestation rows are never changed (database triggers refuse it); every
change here is written to the audit log. :meth:`TrustOps._trust_summaries` answers for
many versions in three queries, so listing datasets stays one pass.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import defer

from labelgen.catalog.names import DatasetRef, InvalidName, check_name
from labelgen.contract import signatures
from labelgen.service import access
from labelgen.service.db import (
    Attestation,
    Dataset,
    Member,
    Signature,
    SigningKey,
    Team,
    User,
    Version,
    iso,
    now,
)
from labelgen.service.errors import ServiceError

__all__ = ["TrustOps", "MAX_REPORT_BYTES"]

MAX_REPORT_BYTES = 64 * 1024
"""Largest audit report stored with an attestation (JSON, its sampled rows dropped)."""
_MAX_INT = 2**31 - 1  # the rows/positions columns' range
_CHUNK = 500  # version ids per IN (...) list


def _key_view(key: SigningKey, team: str) -> dict[str, Any]:
    return {
        "key_id": key.key_id,
        "team": team,
        "name": key.name,
        "owner": key.owner,
        "public_key": key.public_key,
        "created_at": iso(key.created_at),
        "revoked_at": iso(key.revoked_at),
        "revoked_by": key.revoked_by,
    }


def _report_problem(report: Any) -> str | None:
    """What keeps ``report`` from being an audit report worth storing (None: nothing)."""
    if not isinstance(report, Mapping):
        return f"it is a {type(report).__name__}, not a JSON object"
    if not isinstance(report.get("passed"), bool):
        return f"its 'passed' is {report.get('passed')!r:.40}, not true or false"
    for field in ("rows", "positions"):
        value = report.get(field, 0)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_INT:
            return f"its {field!r} is {value!r:.40}, not a whole number from 0 to {_MAX_INT}"
    for field in ("summary", "url", "ref", "teacher", "reference", "dtype"):
        if report.get(field) is not None and not isinstance(report.get(field), str):
            return f"its {field!r} is a {type(report.get(field)).__name__}, not a string"
    for field in ("worst", "first_failure", "checks", "tolerance"):
        if report.get(field) is not None and not isinstance(report.get(field), Mapping):
            return f"its {field!r} is a {type(report.get(field)).__name__}, not an object"
    return None


class _Who:
    """Users' organisation-admin flags and team roles, looked up once for many names."""

    def __init__(self, session: Any, names: Iterable[str]):
        self.admin: dict[str, bool] = {}
        self.roles: dict[str, dict[int, str]] = {}
        wanted = sorted(set(names))
        for start in range(0, len(wanted), _CHUNK):
            rows = session.execute(
                sa.select(User.name, User.is_admin, Member.team_id, Member.role)
                .outerjoin(Member, Member.user_id == User.id)
                .where(User.name.in_(wanted[start : start + _CHUNK]))
            ).all()
            for name, is_admin, team_id, role in rows:
                self.admin[name] = bool(is_admin)
                if team_id is not None:
                    self.roles.setdefault(name, {})[team_id] = role

    def role(self, name: str, team_id: int) -> str | None:
        return self.roles.get(name, {}).get(team_id)

    def may_sign(self, name: str, team_id: int) -> bool:
        return self.admin.get(name, False) or access.rank(self.role(name, team_id)) >= access.rank("writer")

    def trusted_auditor(self, name: str, team_id: int) -> bool:
        return self.admin.get(name, False) or self.role(name, team_id) is not None


def _signature_verdict(
    sig: Signature, key: SigningKey | None, digest: str, team_id: int, team: str, who: _Who
) -> str | None:
    """Why ``sig`` does not count for a version of team ``team`` (None: it is valid)."""
    if key is None:
        return f"its key {sig.key_id} is not registered with this catalog"
    if key.team_id != team_id:
        return f"its key {key.key_id} is not a key of team {team}"
    if key.revoked_at is not None:
        return f"its key {key.key_id} was revoked by {key.revoked_by} at {iso(key.revoked_at)}"
    if sig.signer != key.owner:
        return f"it was posted by {sig.signer}, but key {key.key_id} is {key.owner}'s"
    if not who.may_sign(key.owner, team_id):
        return f"the key's owner {key.owner} is no longer a writer or admin of team {team}"
    if not signatures.verify_digest(key.public_key, digest, sig.signature):
        return f"it does not verify over the version's manifest sha256 {digest} with key {key.key_id}"
    return None


class TrustOps:
    """Mixed into :class:`labelgen.service.store.Catalog` (``self.s``, ``self.caller`` and
    its helpers come from there)."""

    s: Any
    caller: Any

    # ---- keys ------------------------------------------------------------------------------------
    def register_key(self, team: str, public_key: Any, name: Any) -> dict[str, Any]:
        """Register the caller's ed25519 public key (hex) for signing ``team``'s versions."""
        team_row = self._team(team)
        self._require("sign", team_row.name, f"versions of team {team_row.name}")
        try:
            public = signatures.check_public_key(public_key)
            key_name = check_name("key name", name)
        except (signatures.SignatureError, InvalidName) as exc:
            raise ServiceError(
                400, "bad_key", f"{exc}; make a key with `labelgen keys new --out KEY`", team=team_row.name
            ) from exc
        try:
            signatures.require_cryptography().Ed25519PublicKey.from_public_bytes(bytes.fromhex(public))
        except ValueError as exc:
            raise ServiceError(
                400, "bad_key", f"{public} is not an ed25519 public key ({exc})", team=team_row.name
            ) from exc
        key_id = signatures.key_id_of(public)
        existing = self.s.scalar(sa.select(SigningKey).where(SigningKey.key_id == key_id))
        if existing is not None:
            where = "team " + team_row.name if existing.team_id == team_row.id else "another team"
            raise ServiceError(
                409,
                "key_exists",
                f"key {key_id} is already registered (in {where}); a key signs for one team: "
                "make another with `labelgen keys new --out KEY`",
                team=team_row.name,
            )
        key = SigningKey(
            team_id=team_row.id, key_id=key_id, public_key=public, name=key_name, owner=self.caller.name
        )
        self.s.add(key)
        self.s.flush()
        self._audit("key.register", f"key:{key_id}", team=team_row.name, name=key_name)
        return _key_view(key, team_row.name)

    def list_keys(self, team: str) -> dict[str, Any]:
        """``team``'s signing keys, revoked ones included (for its members)."""
        team_row = self._team(team)
        self._require("read", team_row.name, f"the signing keys of team {team_row.name}")
        keys = self.s.scalars(
            sa.select(SigningKey).where(SigningKey.team_id == team_row.id).order_by(SigningKey.id)
        )
        return {"team": team_row.name, "keys": [_key_view(k, team_row.name) for k in keys]}

    def revoke_key(self, team: str, key_id: str) -> dict[str, Any]:
        """Revoke a key (its owner, the team's admins, organisation admins): every signature
        made with it stops counting."""
        team_row = self._team(team)
        key = self.s.scalar(
            sa.select(SigningKey).where(SigningKey.team_id == team_row.id, SigningKey.key_id == str(key_id))
        )
        if key is None:
            raise ServiceError(
                404,
                "no_key",
                f"team {team_row.name} has no key {str(key_id)[:40]!r}; list them with "
                f"`labelgen keys list {team_row.name}`",
                team=team_row.name,
            )
        team_admin = access.rank(self.caller.roles.get(team_row.name)) >= access.rank("admin")
        if key.owner != self.caller.name and not (self.caller.is_admin or team_admin):
            raise ServiceError(
                403,
                "forbidden",
                f"{self.caller.name} may not revoke key {key.key_id}: only its owner {key.owner} "
                f"and the admins of team {team_row.name} can",
                team=team_row.name,
            )
        if key.revoked_at is None:
            key.revoked_at, key.revoked_by = now(), self.caller.name
            self._audit("key.revoke", f"key:{key.key_id}", team=team_row.name, owner=key.owner)
        return _key_view(key, team_row.name)

    # ---- signatures and attestations -------------------------------------------------------------
    def sign_version(self, ref: DatasetRef, key_id: Any, signature: Any) -> dict[str, Any]:
        """Attach the caller's signature of ``ref``'s manifest sha256, made with their key."""
        team, ds, v = self._resolve(ref, action="sign")
        target = f"{team.name}/{ds.name}@{v.number}"
        key = self.s.scalar(sa.select(SigningKey).where(SigningKey.key_id == str(key_id)[:64]))
        register = f"register it with `labelgen keys register {team.name} KEY.pub`"
        if key is None:
            raise ServiceError(
                404, "no_key", f"key {str(key_id)[:40]!r} is not registered; {register}", team=team.name
            )
        if key.team_id != team.id:
            raise ServiceError(
                403,
                "foreign_key",
                f"key {key.key_id} is not a key of team {team.name}, so it cannot sign {target}; "
                f"sign with a key of team {team.name} ({register})",
                team=team.name,
            )
        if key.owner != self.caller.name:
            raise ServiceError(
                403,
                "not_your_key",
                f"key {key.key_id} is {key.owner}'s; {self.caller.name} signs with their own key "
                f"({register})",
                team=team.name,
            )
        if key.revoked_at is not None:
            raise ServiceError(
                409,
                "revoked_key",
                f"key {key.key_id} was revoked at {iso(key.revoked_at)}; make and register a new one "
                "(`labelgen keys new --out KEY`)",
                team=team.name,
            )
        try:
            sig = signatures.check_signature(signature)
        except signatures.SignatureError as exc:
            raise ServiceError(400, "bad_signature", f"{exc}", team=team.name) from exc
        if not signatures.verify_digest(key.public_key, v.manifest_sha256, sig):
            raise ServiceError(
                400,
                "bad_signature",
                f"the signature does not verify over {target}'s manifest sha256 {v.manifest_sha256} with "
                f"key {key.key_id}: the bytes signed are not this version's manifest; sign it with "
                f"`labelgen sign {target} --key KEY`",
                team=team.name,
            )
        exists = self.s.scalar(
            sa.select(Signature.id).where(Signature.version_id == v.id, Signature.key_id == key.key_id)
        )
        if exists is not None:
            raise ServiceError(
                409, "already_signed", f"{target} is already signed with key {key.key_id}", team=team.name
            )
        row = Signature(version_id=v.id, key_id=key.key_id, signature=sig, signer=self.caller.name)
        self.s.add(row)
        self.s.flush()
        self._audit("sign", target, team=team.name, key_id=key.key_id, manifest_sha256=v.manifest_sha256)
        return {
            "ref": target,
            "key_id": key.key_id,
            "signer": row.signer,
            "signature": sig,
            "created_at": iso(row.created_at),
            "valid": True,
            "reason": None,
        }

    def attest_version(self, ref: DatasetRef, report: Any) -> dict[str, Any]:
        """Store an audit report (``labelgen audit``'s) as an attestation by the caller."""
        team, ds, v = self._resolve(ref, action="attest")
        target = f"{team.name}/{ds.name}@{v.number}"
        problem = _report_problem(report)
        if problem is not None:
            raise ServiceError(
                400,
                "bad_report",
                f"the audit report for {target} is not valid ({problem}); post the report "
                f"`labelgen audit {target} --attest` writes",
                team=team.name,
            )
        kept = {k: val for k, val in report.items() if k != "sampled"}
        text = json.dumps(kept, sort_keys=True, default=str)
        if len(text.encode()) > MAX_REPORT_BYTES:
            raise ServiceError(
                413,
                "report_too_large",
                f"the audit report for {target} is {len(text.encode())} bytes of JSON; attestations hold at "
                f"most {MAX_REPORT_BYTES} (its sampled rows are dropped already)",
                team=team.name,
            )
        row = Attestation(
            version_id=v.id,
            auditor=self.caller.name,
            passed=kept["passed"],
            rows=int(kept.get("rows", 0)),
            positions=int(kept.get("positions", 0)),
            report=text,
        )
        self.s.add(row)
        self.s.flush()
        self._audit("attest", target, team=team.name, passed=row.passed, rows=row.rows, attestation=row.id)
        trusted = _Who(self.s, [row.auditor]).trusted_auditor(row.auditor, team.id)
        return {"ref": target, **_attestation_view(row, kept, trusted)}

    # ---- views -----------------------------------------------------------------------------------
    def trust_view(self, ref: DatasetRef) -> dict[str, Any]:
        """Everything that vouches for ``ref`` (for its readers), with the catalog's verdicts."""
        team, ds, v = self._resolve(ref)
        found = self._trust_rows([v.id], with_reports=True)[v.id]
        keys = {k.key_id: k for _, k, _ in found["signatures"] if k is not None}
        return {
            "ref": f"{team.name}/{ds.name}@{v.number}",
            "team": team.name,
            "manifest_sha256": v.manifest_sha256,
            **found["summary"],
            "signatures": [
                {
                    "key_id": sig.key_id,
                    "signer": sig.signer,
                    "signature": sig.signature,
                    "created_at": iso(sig.created_at),
                    "valid": reason is None,
                    "reason": reason,
                }
                for sig, _, reason in found["signatures"]
            ],
            "attestations": [
                _attestation_view(a, _report(a), trusted) for a, trusted in reversed(found["attestations"])
            ],
            "keys": [_key_view(k, team.name if k.team_id == team.id else "?") for k in keys.values()],
        }

    def _trust_summaries(self, version_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """``{"signed", "audited", "signatures", "audits"}`` for each version id (three queries)."""
        rows = self._trust_rows(version_ids, with_reports=False)
        return {vid: found["summary"] for vid, found in rows.items()}

    def _trust_rows(self, version_ids: Iterable[int], with_reports: bool) -> dict[int, dict[str, Any]]:
        """Per version id: its signatures (row, key, why not valid), attestations (row,
        trusted; oldest first) and summary."""
        ids = sorted(set(version_ids))
        out: dict[int, dict[str, Any]] = {
            vid: {"signatures": [], "attestations": [], "summary": None} for vid in ids
        }
        owners: dict[int, tuple[int, str, str]] = {}  # version id → (team id, team name, manifest sha256)
        sig_rows, att_rows = [], []
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            for vid, team_id, team_name, digest in self.s.execute(
                sa.select(Version.id, Team.id, Team.name, Version.manifest_sha256)
                .join(Dataset, Dataset.id == Version.dataset_id)
                .join(Team, Team.id == Dataset.team_id)
                .where(Version.id.in_(chunk))
            ):
                owners[vid] = (team_id, team_name, digest)
            sig_rows += self.s.execute(
                sa.select(Signature, SigningKey)
                .outerjoin(SigningKey, SigningKey.key_id == Signature.key_id)
                .where(Signature.version_id.in_(chunk))
                .order_by(Signature.id)
            ).all()
            query = sa.select(Attestation).where(Attestation.version_id.in_(chunk)).order_by(Attestation.id)
            if not with_reports:  # reports are up to 64 KiB each; summaries need none of them
                query = query.options(defer(Attestation.report))
            att_rows += self.s.scalars(query).all()
        who = _Who(self.s, [k.owner for _, k in sig_rows if k is not None] + [a.auditor for a in att_rows])
        for sig, key in sig_rows:
            team_id, team_name, digest = owners[sig.version_id]
            reason = _signature_verdict(sig, key, digest, team_id, team_name, who)
            out[sig.version_id]["signatures"].append((sig, key, reason))
        for att in att_rows:
            team_id = owners[att.version_id][0]
            out[att.version_id]["attestations"].append((att, who.trusted_auditor(att.auditor, team_id)))
        for found in out.values():
            trusted = [a for a, ok in found["attestations"] if ok]
            found["summary"] = {
                "signed": any(reason is None for _, _, reason in found["signatures"]),
                "audited": bool(trusted) and trusted[-1].passed,
                "signatures": len(found["signatures"]),
                "audits": len(found["attestations"]),
            }
        return out


def _report(att: Attestation) -> dict[str, Any]:
    try:
        data = json.loads(att.report)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _attestation_view(att: Attestation, report: Mapping[str, Any], trusted: bool) -> dict[str, Any]:
    return {
        "id": att.id,
        "auditor": att.auditor,
        "passed": att.passed,
        "rows": att.rows,
        "positions": att.positions,
        "summary": report.get("summary"),
        "worst": report.get("worst"),
        "first_failure": report.get("first_failure"),
        "reference": report.get("reference"),
        "seed": report.get("seed"),
        "created_at": iso(att.created_at),
        "trusted": trusted,
    }
