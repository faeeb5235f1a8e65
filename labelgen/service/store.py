"""Catalog operations over one database session: the service's behaviour, minus HTTP.

Every operation takes the :class:`Caller` (who the token belongs to) and checks access
through :func:`labelgen.service.access.allowed` before it reads or changes anything;
refusals raise :class:`~labelgen.service.errors.ServiceError` with the status the API
returns (401, 403, 404, 409, 400). Successful changes and data accesses append to the
audit log in the same transaction; refusals are logged by the caller of the store in a
transaction of their own (:func:`record_refusal`), so a rolled-back request still
leaves its line.

Tokens: ``lgt_`` + 43 URL-safe characters (256 random bits); only their sha256 is
stored, so a database dump holds no usable token.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from labelgen.catalog.names import TOKEN_PREFIX, DatasetRef, InvalidName, check_name, new_token
from labelgen.service import access
from labelgen.service.db import (
    Alias,
    AuditEvent,
    Dataset,
    Member,
    Run,
    Setting,
    Share,
    Team,
    Token,
    User,
    Version,
    iso,
    now,
)
from labelgen.service.errors import ServiceError
from labelgen.service.jobs import JobOps
from labelgen.service.runs import RunOps
from labelgen.service.trust import TrustOps

__all__ = [
    "Caller",
    "hash_token",
    "authenticate",
    "bootstrap_admin",
    "signing_key",
    "record",
    "record_refusal",
    "Catalog",
]

_MAX_TOKEN_DAYS = 3650


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


_iso = iso


def _name(kind: str, value: object) -> str:
    try:
        return check_name(kind, value)
    except InvalidName as exc:
        raise ServiceError(400, "bad_name", str(exc)) from exc


@dataclass(frozen=True)
class Caller:
    """The user behind a request's token, with their team roles."""

    user_id: int
    name: str
    is_admin: bool
    roles: dict[str, str] = field(default_factory=dict)  # team name → role
    token_id: int = 0  # the token this request came with (read URLs are bound to it)
    token_expires: dt.datetime | None = None  # its expiry: tokens it creates expire no later


def record(
    session: Session,
    actor: str | None,
    action: str,
    target: str,
    outcome: str = "ok",
    status: int = 200,
    team: str | None = None,
    **detail: Any,
) -> None:
    """Append one line to the audit log (committed with the session's transaction)."""
    session.add(
        AuditEvent(
            actor=actor,
            action=action,
            target=target[:512],
            team=team,
            outcome=outcome,
            status=status,
            detail=json.dumps({k: _clip(v) for k, v in detail.items()}, sort_keys=True, default=str),
        )
    )


def _clip(value: Any, limit: int = 2000) -> Any:
    """Long strings in audit details cut to ``limit`` characters (the detail stays valid JSON)."""
    return value[:limit] + "…" if isinstance(value, str) and len(value) > limit else value


def record_refusal(sessions: Any, actor: str | None, action: str, target: str, error: ServiceError) -> None:
    """Log a refused request in its own transaction (the request's own one rolled back)."""
    with sessions.begin() as session:
        record(session, actor, action, target, "refused", error.status, error.team, reason=error.message)


def _detail(text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except ValueError:  # written by an older release: shown as text
        return {"text": text}


def authenticate(session: Session, token: str | None) -> Caller:
    """The caller a bearer token belongs to; 401 if it is missing, unknown, expired or revoked."""
    if not token:
        raise ServiceError(
            401,
            "no_token",
            "this call needs a token: send `Authorization: Bearer TOKEN` (run `labelgen login HOST`, "
            "or set LABELGEN_TOKEN)",
        )
    return _caller(session, Token.token_hash == hash_token(token))


def caller_by_token_id(session: Session, token_id: int) -> Caller:
    """The caller behind token ``token_id`` (a read URL bound to it); 401 as :func:`authenticate`."""
    return _caller(session, Token.id == token_id)


def _caller(session: Session, which: Any) -> Caller:
    # One round trip: the token, its user and the user's team roles (one row per team).
    rows = session.execute(
        sa.select(Token, User, Team.name, Member.role)
        .join(User, Token.user_id == User.id)
        .outerjoin(Member, Member.user_id == User.id)
        .outerjoin(Team, Team.id == Member.team_id)
        .where(which)
    ).all()
    row = rows[0] if rows else None
    if row is None:
        raise ServiceError(
            401,
            "bad_token",
            "the token is not known to this service; create one with `labelgen token create`",
        )
    tok, user = row[0], row[1]
    if tok.revoked_at is not None:
        raise ServiceError(
            401,
            "revoked_token",
            f"token {tok.prefix}… was revoked; create a new one with `labelgen token create`",
        )
    if tok.expires_at is not None and tok.expires_at <= now():
        raise ServiceError(
            401,
            "expired_token",
            f"token {tok.prefix}… expired at {_iso(tok.expires_at)}; "
            "create a new one with `labelgen token create`",
        )
    roles = {team: role for _, _, team, role in rows if team is not None}
    return Caller(user.id, user.name, user.is_admin, roles, tok.id, tok.expires_at)


def bootstrap_admin(session: Session, name: str, token: str | None) -> str | None:
    """On an empty catalog, create the organisation admin ``name`` with ``token`` (a new
    one when None). Returns the token when one was generated, else None; a catalog that
    already has users is left alone (a given token is added to ``name`` if it is new)."""
    name = _name("admin user", name)
    if token is not None and not token.startswith(TOKEN_PREFIX):
        raise ValueError(
            f"LABELGEN_BOOTSTRAP_TOKEN must start with {TOKEN_PREFIX!r}; make one with `labelgen token new` "
            "(it prints a fresh token and stores nothing)"
        )
    has_users = session.scalar(sa.select(sa.func.count()).select_from(User)) > 0
    if has_users and token is None:
        return None
    user = session.scalar(sa.select(User).where(User.name == name))
    if user is None:
        if has_users:
            return None
        user = User(name=name, is_admin=True)
        session.add(user)
        session.flush()
    generated = token is None
    token = token or new_token()
    if session.scalar(sa.select(Token).where(Token.token_hash == hash_token(token))) is None:
        session.add(Token(user_id=user.id, name="bootstrap", token_hash=hash_token(token), prefix=token[:10]))
        record(session, "system", "token.create", f"user:{name}", name="bootstrap")
    return token if generated else None


def signing_key(session: Session, given: str | None = None) -> bytes:
    """The key that signs the service's byte-range URLs: ``given`` (LABELGEN_SIGNING_KEY),
    else one made at first start and kept in the catalog (so restarts keep URLs valid)."""
    if given:
        return given.encode()
    row = session.get(Setting, "signing_key")
    if row is None:
        row = Setting(key="signing_key", value=secrets.token_hex(32))
        session.add(row)
        session.flush()
    return row.value.encode()


Conflict = sa.exc.IntegrityError
"""Raised on commit when two requests created the same row (e.g. the same version number)."""


def ping(session: Session) -> None:
    """One round trip to the database (the health check)."""
    session.execute(sa.text("SELECT 1"))


def version_storage(session: Session, version_id: int) -> tuple[str, list[dict[str, Any]]] | None:
    """(storage URL, files) of a version by id, for the byte-range route; None if unknown."""
    row = session.get(Version, version_id)
    return None if row is None else (row.url, json.loads(row.files))


class Catalog(TrustOps, RunOps, JobOps):
    """The catalog as one caller sees it, over one session (one transaction per request)."""

    def __init__(self, session: Session, caller: Caller):
        self.s = session
        self.caller = caller

    # ---- helpers ---------------------------------------------------------------------------------
    def _audit(self, action: str, target: str, team: str | None = None, **detail: Any) -> None:
        record(self.s, self.caller.name, action, target, team=team, **detail)

    def _team(self, name: str) -> Team:
        name = _name("team", name)
        team = self.s.scalar(sa.select(Team).where(Team.name == name))
        if team is None:
            raise ServiceError(
                404,
                "no_team",
                f"team {name!r} does not exist; "
                f"an organisation admin creates it with `labelgen teams create {name}`",
            )
        return team

    def _admins(self, team: str) -> list[str]:
        return list(
            self.s.scalars(
                sa.select(User.name)
                .join(Member, Member.user_id == User.id)
                .join(Team, Team.id == Member.team_id)
                .where(Team.name == team, Member.role == "admin")
                .order_by(User.name)
            )
        )

    def _shares(self, dataset_id: int) -> list[str]:
        return list(
            self.s.scalars(
                sa.select(Share.grantee).where(Share.dataset_id == dataset_id).order_by(Share.grantee)
            )
        )

    def _may(self, action: str, team: str, dataset_id: int | None = None) -> bool:
        shares = self._shares(dataset_id) if dataset_id is not None and action in ("read", "attest") else ()
        return access.allowed(action, team, self.caller.roles, shares, self.caller.is_admin)

    def _require(self, action: str, team: str, what: str, dataset_id: int | None = None) -> None:
        if self._may(action, team, dataset_id):
            return
        admins = self._admins(team)
        who = f"an admin of team {team} ({', '.join(admins)})" if admins else f"an admin of team {team}"
        role = access.needed_role(action)
        fix = (
            f"{who} can share it with your team (`labelgen share {what} TEAM`)"
            if action == "read"
            else (
                f"{who} can make you a {role} "
                f"(`labelgen teams add-member {team} {self.caller.name} --role {role}`)"
            )
        )
        raise ServiceError(
            403,
            "forbidden",
            f"{self.caller.name} may not {action} {what}: it needs the {role} role in team {team}; {fix}",
            team=team,
        )

    def _dataset(self, team: str, name: str) -> tuple[Team, Dataset]:
        team, name = _name("team", team), _name("dataset", name)
        found = self.s.execute(
            sa.select(Team, Dataset)
            .join(Dataset, Dataset.team_id == Team.id)
            .where(Team.name == team, Dataset.name == name)
        ).first()
        if found is not None:
            return found[0], found[1]
        self._team(team)  # 404 naming the team if it is the team that is missing
        raise ServiceError(
            404,
            "no_dataset",
            f"dataset {team}/{name} does not exist; publish it with `labelgen publish URL {team}/{name}`",
            team=team,
        )

    def _aliases(self, dataset_id: int) -> dict[str, int]:
        rows = self.s.execute(
            sa.select(Alias.name, Version.number)
            .join(Version, Version.id == Alias.version_id)
            .where(Alias.dataset_id == dataset_id)
        ).all()
        return {name: number for name, number in sorted(rows)}

    def _resolve(self, ref: DatasetRef, action: str = "read") -> tuple[Team, Dataset, Version]:
        team, ds = self._dataset(ref.team, ref.name)
        self._require(action, team.name, f"{team.name}/{ds.name}", ds.id)
        number = ref.version
        if number is None:
            alias = _name("alias", ref.ref)
            version = self.s.scalar(
                sa.select(Version)
                .join(Alias, Alias.version_id == Version.id)
                .where(Alias.dataset_id == ds.id, Alias.name == alias)
            )
            missing = f"alias @{alias}"
        else:
            version = self.s.scalar(
                sa.select(Version).where(Version.dataset_id == ds.id, Version.number == number)
            )
            missing = f"version @{number}"
        if version is None:
            known = ", ".join(
                f"@{n}"
                for n in self.s.scalars(
                    sa.select(Version.number).where(Version.dataset_id == ds.id).order_by(Version.number)
                )
            )
            raise ServiceError(
                404,
                "no_version",
                f"{team.name}/{ds.name} has no {missing} (versions: {known or 'none'})",
                team=team.name,
            )
        return team, ds, version

    def _version_view(
        self, team: str, ds: Dataset, v: Version, detail: bool = True, trust: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A version as the API shows it; ``trust``: its summary when the caller looked up
        many at once (:meth:`TrustOps._trust_summaries`), else looked up here."""
        aliases = [name for name, number in self._aliases(ds.id).items() if number == v.number]
        files = json.loads(v.files)
        out: dict[str, Any] = {
            "ref": f"{team}/{ds.name}@{v.number}",
            "team": team,
            "name": ds.name,
            "version": v.number,
            "url": v.url,
            "manifest_sha256": v.manifest_sha256,
            "card": json.loads(v.card),
            "files": len(files),
            "bytes": sum(f["size"] for f in files),
            "published_by": v.published_by,
            "created_at": _iso(v.created_at),
            "aliases": aliases,
            "trust": trust if trust is not None else self._trust_summaries([v.id])[v.id],
        }
        if detail:
            out["job_spec"] = v.job_spec
            out["runs"] = [
                {"id": r.id, "name": r.name, "user": r.user, "created_at": _iso(r.created_at)}
                for r in self.s.scalars(sa.select(Run).where(Run.version_id == v.id).order_by(Run.id))
            ]
        return out

    # ---- identity, teams, tokens -----------------------------------------------------------------
    def whoami(self) -> dict[str, Any]:
        return {
            "user": self.caller.name,
            "admin": self.caller.is_admin,
            "teams": dict(sorted(self.caller.roles.items())),
        }

    def create_team(self, name: str) -> dict[str, Any]:
        name = _name("team", name)
        if not self.caller.is_admin:
            raise ServiceError(
                403,
                "forbidden",
                f"{self.caller.name} may not create teams: only organisation admins can; "
                f"ask one to run `labelgen teams create {name}`",
            )
        if self.s.scalar(sa.select(Team).where(Team.name == name)) is not None:
            raise ServiceError(409, "exists", f"team {name!r} already exists; pick another name")
        self.s.add(Team(name=name))
        self._audit("team.create", f"team:{name}", team=name)
        return {"name": name}

    def set_member(self, team: str, user: str, role: str) -> dict[str, Any]:
        team_row = self._team(team)
        user = _name("user", user)
        try:
            role = access.check_role(role)
        except ValueError as exc:
            raise ServiceError(400, "bad_role", str(exc)) from exc
        self._require("grant", team_row.name, f"team {team_row.name}'s members")
        user_row = self.s.scalar(sa.select(User).where(User.name == user))
        if user_row is None:
            user_row = User(name=user, is_admin=False)
            self.s.add(user_row)
            self.s.flush()
        member = self.s.get(Member, (team_row.id, user_row.id))
        if member is None:
            self.s.add(Member(team_id=team_row.id, user_id=user_row.id, role=role))
        else:
            member.role = role
        self._audit("member.set", f"team:{team_row.name}", team=team_row.name, user=user, role=role)
        return {"team": team_row.name, "user": user, "role": role}

    def remove_member(self, team: str, user: str) -> dict[str, Any]:
        team_row = self._team(team)
        user = _name("user", user)
        self._require("grant", team_row.name, f"team {team_row.name}'s members")
        user_row = self.s.scalar(sa.select(User).where(User.name == user))
        member = self.s.get(Member, (team_row.id, user_row.id)) if user_row is not None else None
        if member is None:
            raise ServiceError(
                404, "no_member", f"{user} is not a member of team {team_row.name}", team=team_row.name
            )
        self.s.delete(member)
        self._audit("member.remove", f"team:{team_row.name}", team=team_row.name, user=user)
        return {"team": team_row.name, "user": user, "removed": True}

    def create_token(self, name: str, expires_days: float | None, user: str | None) -> dict[str, Any]:
        name = _name("token name", name)
        owner = self.caller.name if user is None else _name("user", user)
        if owner != self.caller.name and not self.caller.is_admin:
            raise ServiceError(
                403,
                "forbidden",
                f"{self.caller.name} may not create tokens for {owner}: only organisation admins can; "
                f"{owner} can run `labelgen token create` with their own token",
            )
        owner_row = self.s.scalar(sa.select(User).where(User.name == owner))
        if owner_row is None:
            raise ServiceError(
                404,
                "no_user",
                f"user {owner!r} does not exist; "
                f"a team admin adds them with `labelgen teams add-member TEAM {owner} --role reader`",
            )
        expires = None
        if expires_days is not None:
            if not 0 < expires_days <= _MAX_TOKEN_DAYS:
                raise ServiceError(
                    400, "bad_expiry", f"expires_days must be in (0, {_MAX_TOKEN_DAYS}], got {expires_days}"
                )
            expires = now() + dt.timedelta(days=expires_days)
        if self.caller.token_expires is not None and (expires is None or expires > self.caller.token_expires):
            expires = self.caller.token_expires  # a token never outlives the one that made it
        token = new_token()
        row = Token(
            user_id=owner_row.id,
            name=name,
            token_hash=hash_token(token),
            prefix=token[:10],
            expires_at=expires,
        )
        self.s.add(row)
        self.s.flush()
        self._audit("token.create", f"user:{owner}", token_id=row.id, name=name, expires_at=_iso(expires))
        return {"id": row.id, "token": token, "user": owner, "name": name, "expires_at": _iso(expires)}

    def _token_view(self, t: Token, user: str) -> dict[str, Any]:
        return {
            "id": t.id,
            "user": user,
            "name": t.name,
            "prefix": t.prefix,
            "created_at": _iso(t.created_at),
            "expires_at": _iso(t.expires_at),
            "revoked_at": _iso(t.revoked_at),
        }

    def list_tokens(self, user: str | None = None) -> dict[str, Any]:
        query = sa.select(Token, User.name).join(User, User.id == Token.user_id).order_by(Token.id)
        if not self.caller.is_admin:
            query = query.where(Token.user_id == self.caller.user_id)
        elif user is not None:
            query = query.where(User.name == _name("user", user))
        return {"tokens": [self._token_view(t, name) for t, name in self.s.execute(query).all()]}

    def revoke_token(self, token_id: int) -> dict[str, Any]:
        row = self.s.get(Token, token_id)
        if row is None or (row.user_id != self.caller.user_id and not self.caller.is_admin):
            raise ServiceError(
                404, "no_token_id", f"no token {token_id} of yours; list yours with `labelgen token list`"
            )
        if row.revoked_at is None:
            row.revoked_at = now()
        owner = self.s.get(User, row.user_id)
        self._audit("token.revoke", f"user:{owner.name if owner else '?'}", token_id=token_id)
        return self._token_view(row, owner.name if owner else "?")

    # ---- datasets and versions -------------------------------------------------------------------
    def check_publish(self, team: str, name: str, url: str) -> None:
        """Refuse early (before the expensive verification) if the caller may not publish."""
        team_row = self._team(team)
        self._require("publish", team_row.name, f"{team_row.name}/{_name('dataset', name)}")
        self.check_storage(url)

    def check_storage(self, url: str) -> None:
        """403 if ``url``, a directory above it or one inside it already holds a version of a
        dataset the caller may not publish to: registering another team's storage under
        your own name would be reading it without its team's consent."""
        parts = url.rstrip("/").split("/")
        above = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        inside = url.rstrip("/") + "/"
        rows = self.s.execute(
            sa.select(Team.name, Dataset.name)
            .join(Dataset, Dataset.team_id == Team.id)
            .join(Version, Version.dataset_id == Dataset.id)
            .where(sa.or_(Version.url.in_(above), Version.url.startswith(inside, autoescape=True)))
            .distinct()
        ).all()
        for team, dataset in rows:
            if not access.allowed("publish", team, self.caller.roles, (), self.caller.is_admin):
                raise ServiceError(
                    403,
                    "foreign_storage",
                    f"{url} is (or overlaps) the storage of {team}/{dataset}, which {self.caller.name} may "
                    f"not publish to; ask team {team} to share {team}/{dataset} with your team instead",
                    team=team,
                )

    def publish(
        self, team: str, name: str, verified: Any, aliases: list[str], job_spec: str | None
    ) -> dict[str, Any]:
        """Register a verified dataset (:class:`labelgen.service.verify.VerifiedDataset`) as
        the next version of ``team/name`` (created if new); move ``latest`` and ``aliases``."""
        team_row = self._team(team)
        name = _name("dataset", name)
        aliases = [_name("alias", a) for a in aliases]
        self._require("publish", team_row.name, f"{team_row.name}/{name}")
        self.check_storage(verified.url)
        ds = self.s.scalar(sa.select(Dataset).where(Dataset.team_id == team_row.id, Dataset.name == name))
        newest = (
            self.s.scalar(
                sa.select(Version).where(Version.dataset_id == ds.id).order_by(Version.number.desc()).limit(1)
            )
            if ds is not None
            else None
        )
        if newest is not None and (newest.url, newest.manifest_sha256) == (
            verified.url,
            verified.manifest_sha256,
        ):
            # The same bytes again (a retried publish): that version, aliases moved as asked.
            for alias in aliases:
                if alias != "latest":
                    self._move_alias(ds, team_row.name, alias, newest)
            return {**self._version_view(team_row.name, ds, newest), "existing": True}
        if ds is None:
            ds = Dataset(team_id=team_row.id, name=name, created_by=self.caller.name)
            self.s.add(ds)
            self.s.flush()
        number = (
            self.s.scalar(sa.select(sa.func.max(Version.number)).where(Version.dataset_id == ds.id)) or 0
        ) + 1
        card = verified.card
        products = sorted(product for product, value in (card.get("products") or {}).items() if value)
        files = [{"path": f.path, "size": f.size, "sha256": f.sha256, "kind": f.kind} for f in verified.files]
        version = Version(
            dataset_id=ds.id,
            number=number,
            url=verified.url,
            manifest_sha256=verified.manifest_sha256,
            files=json.dumps(files),
            card=json.dumps(card, sort_keys=True, default=str),
            job_spec=job_spec if job_spec is not None else verified.job_spec,
            teacher=str((card.get("teacher") or {}).get("model") or "")[:1024],
            tokenizer=str((card.get("tokenizer") or {}).get("fingerprint") or "")[:64],
            k=int(card.get("k") or 0),
            products=",".join(products),
            tokens=int(card.get("tokens") or 0),
            bytes=sum(f["size"] for f in files),
            published_by=self.caller.name,
        )
        self.s.add(version)
        self.s.flush()
        ref = f"{team_row.name}/{name}@{number}"
        self._audit(
            "publish",
            ref,
            team=team_row.name,
            url=verified.url,
            manifest_sha256=verified.manifest_sha256,
            files=len(files),
        )
        for alias in ["latest", *[a for a in aliases if a != "latest"]]:
            self._move_alias(ds, team_row.name, alias, version)
        return self._version_view(team_row.name, ds, version)

    def _move_alias(self, ds: Dataset, team: str, alias: str, version: Version) -> None:
        row = self.s.get(Alias, (ds.id, alias))
        before = None
        if row is None:
            self.s.add(Alias(dataset_id=ds.id, name=alias, version_id=version.id, moved_by=self.caller.name))
        else:
            before = row.version_id
            row.version_id, row.moved_by, row.moved_at = version.id, self.caller.name, now()
        previous = self.s.get(Version, before) if before is not None else None
        self._audit(
            "alias.move",
            f"{team}/{ds.name}@{alias}",
            team=team,
            to=version.number,
            **({"from": previous.number} if previous else {}),
        )

    def set_alias(self, team: str, name: str, alias: str, number: int) -> dict[str, Any]:
        alias = _name("alias", alias)
        if alias == "latest":
            raise ServiceError(
                400, "latest_alias", "@latest always names the newest version; move another alias instead"
            )
        _, _, version = self._resolve(DatasetRef(team, name, str(number)), action="alias")
        team_row, ds = self._dataset(team, name)
        self._move_alias(ds, team_row.name, alias, version)
        return {"ref": f"{team_row.name}/{ds.name}@{alias}", "version": version.number}

    def delete_alias(self, team: str, name: str, alias: str) -> dict[str, Any]:
        alias = _name("alias", alias)
        team_row, ds = self._dataset(team, name)
        self._require("alias", team_row.name, f"{team_row.name}/{ds.name}")
        if alias == "latest":
            raise ServiceError(
                400,
                "latest_alias",
                "@latest always names the newest version and cannot be deleted; move another alias instead",
            )
        row = self.s.get(Alias, (ds.id, alias))
        if row is None:
            raise ServiceError(
                404, "no_alias", f"{team_row.name}/{ds.name} has no alias @{alias}", team=team_row.name
            )
        self.s.delete(row)
        self._audit("alias.delete", f"{team_row.name}/{ds.name}@{alias}", team=team_row.name)
        return {"ref": f"{team_row.name}/{ds.name}@{alias}", "deleted": True}

    def share(self, team: str, name: str, grantee: str, grant: bool = True) -> dict[str, Any]:
        team_row, ds = self._dataset(team, name)
        what = f"{team_row.name}/{ds.name}"
        self._require("grant", team_row.name, what)
        if grantee != "*":
            grantee = self._team(grantee).name
        row = self.s.get(Share, (ds.id, grantee))
        if grant and row is None:
            self.s.add(Share(dataset_id=ds.id, grantee=grantee, granted_by=self.caller.name))
        elif not grant:
            if row is None:
                raise ServiceError(
                    404, "no_share", f"{what} is not shared with {grantee}", team=team_row.name
                )
            self.s.delete(row)
        self._audit("share.grant" if grant else "share.revoke", what, team=team_row.name, grantee=grantee)
        self.s.flush()
        return {"dataset": what, "shares": self._shares(ds.id)}

    def dataset(self, team: str, name: str) -> dict[str, Any]:
        team_row, ds = self._dataset(team, name)
        what = f"{team_row.name}/{ds.name}"
        self._require("read", team_row.name, what, ds.id)
        versions = list(
            self.s.scalars(sa.select(Version).where(Version.dataset_id == ds.id).order_by(Version.number))
        )
        trust = self._trust_summaries(v.id for v in versions)
        return {
            "team": team_row.name,
            "name": ds.name,
            "created_by": ds.created_by,
            "created_at": _iso(ds.created_at),
            "versions": [
                self._version_view(team_row.name, ds, v, detail=False, trust=trust[v.id]) for v in versions
            ],
            "aliases": self._aliases(ds.id),
            "shares": self._shares(ds.id),
        }

    def version(self, ref: DatasetRef) -> dict[str, Any]:
        team, ds, v = self._resolve(ref)
        return self._version_view(team.name, ds, v)

    def check_read_version(self, version_id: int) -> None:
        """403 unless the caller may still read the dataset of version ``version_id``."""
        row = self.s.execute(
            sa.select(Team.name, Dataset.id, Dataset.name)
            .join(Dataset, Dataset.team_id == Team.id)
            .join(Version, Version.dataset_id == Dataset.id)
            .where(Version.id == version_id)
        ).first()
        if row is None:
            raise ServiceError(404, "no_version", f"no version with id {version_id}")
        self._require("read", row[0], f"{row[0]}/{row[2]}", row[1])

    def file_records(self, ref: DatasetRef) -> list[dict[str, Any]]:
        """The version's file records (path, size, sha256, kind) for a reader, without read
        URLs and not audited: what a catalog page shows, not a data access."""
        return json.loads(self._resolve(ref)[2].files)

    def version_files(self, ref: DatasetRef) -> tuple[dict[str, Any], Version]:
        """The version's files (path, size, sha256) for a reader; audited as a data access."""
        team, ds, v = self._resolve(ref)
        out = {
            "ref": f"{team.name}/{ds.name}@{v.number}",
            "version": v.number,
            "version_id": v.id,
            "url": v.url,
            "manifest_sha256": v.manifest_sha256,
            "files": json.loads(v.files),
        }
        self._audit("read", out["ref"], team=team.name, asked=str(ref))
        return out, v

    def list_datasets(self, filters: dict[str, Any]) -> dict[str, Any]:
        """Readable datasets whose newest version matches every filter given."""
        newest = (
            sa.select(Version.dataset_id, sa.func.max(Version.number).label("number"))
            .group_by(Version.dataset_id)
            .subquery()
        )
        query = (
            sa.select(Team, Dataset, Version)
            .join(Dataset, Dataset.team_id == Team.id)
            .join(newest, newest.c.dataset_id == Dataset.id)
            .join(Version, sa.and_(Version.dataset_id == Dataset.id, Version.number == newest.c.number))
            .order_by(Team.name, Dataset.name)
        )
        if filters.get("team"):
            query = query.where(Team.name == _name("team", filters["team"]))
        if filters.get("name"):
            query = query.where(
                sa.func.lower(Dataset.name).contains(str(filters["name"]).lower()[:64], autoescape=True)
            )
        if filters.get("teacher"):
            query = query.where(
                sa.func.lower(Version.teacher).contains(
                    str(filters["teacher"]).lower()[:256], autoescape=True
                )
            )
        if filters.get("tokenizer"):
            query = query.where(Version.tokenizer == str(filters["tokenizer"])[:64])
        if filters.get("k") is not None:
            query = query.where(Version.k == int(filters["k"]))
        if filters.get("min_tokens") is not None:
            query = query.where(Version.tokens >= int(filters["min_tokens"]))
        if filters.get("max_tokens") is not None:
            query = query.where(Version.tokens <= int(filters["max_tokens"]))
        if filters.get("min_bytes") is not None:
            query = query.where(Version.bytes >= int(filters["min_bytes"]))
        if filters.get("max_bytes") is not None:
            query = query.where(Version.bytes <= int(filters["max_bytes"]))
        wanted = [p for p in str(filters.get("products") or "").split(",") if p]
        found = []
        for team, ds, v in self.s.execute(query).all():
            if not self._may("read", team.name, ds.id):
                continue
            if wanted and not set(wanted) <= set(v.products.split(",")):
                continue
            found.append((team, ds, v))
        trust = self._trust_summaries(v.id for _, _, v in found)  # one lookup for every row
        out = [
            {
                "team": team.name,
                "name": ds.name,
                "latest": self._version_view(team.name, ds, v, detail=False, trust=trust[v.id]),
                "aliases": self._aliases(ds.id),
                "trust": trust[v.id],
            }
            for team, ds, v in found
        ]
        return {"datasets": out}

    def audit(self, team: str | None, action: str | None, limit: int) -> dict[str, Any]:
        if team is not None:
            team = self._team(team).name
        if not self.caller.is_admin and (
            team is None or access.rank(self.caller.roles.get(team)) < access.rank("admin")
        ):
            raise ServiceError(
                403,
                "forbidden",
                f"{self.caller.name} may read the audit log of a team they admin only; "
                "pass --team TEAM (one you admin)",
                team=team,
            )
        query = sa.select(AuditEvent).order_by(AuditEvent.id.desc()).limit(max(1, min(limit, 10_000)))
        if team is not None:
            query = query.where(AuditEvent.team == team)
        if action:
            query = query.where(AuditEvent.action == action)
        return {
            "events": [
                {
                    "id": e.id,
                    "at": _iso(e.at),
                    "actor": e.actor,
                    "action": e.action,
                    "target": e.target,
                    "team": e.team,
                    "outcome": e.outcome,
                    "status": e.status,
                    "detail": _detail(e.detail),
                }
                for e in self.s.scalars(query)
            ]
        }
