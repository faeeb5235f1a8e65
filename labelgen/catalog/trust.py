"""What vouches for a label dataset, checked on the reader's side: signatures and audits.

:func:`check_version` asks the catalog what vouches for a version, then reads the
version's ``manifest.json`` itself, hashes it, and verifies every signature against
those bytes with the public keys (the catalog's, or the ones the caller pins): a
signature counts only when this process verified it *and* the catalog still counts it
(its key not revoked, its owner still a writer of the team). Audits cannot be verified
here (they are the catalog's record of who ran ``labelgen audit``): one counts when the
catalog trusts its auditor (a member of the owning team, or an organisation admin).

:func:`require_trusted` is what the trainer's ``data.require: [signed, audited]`` calls:
it refuses (:class:`TrustRefused`) a version that lacks what is required, naming the
version and what is missing. Plain URLs (outside the catalog) carry detached signature
files (:mod:`labelgen.contract.signatures`): :func:`sign_url` writes one,
:func:`check_url` verifies them against keys the caller gives.

Imports only the standard library, fsspec, :mod:`labelgen.contract` and
:mod:`labelgen.catalog` (``cryptography`` when a signature is made or checked).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec

from labelgen.catalog.client import CatalogClient, CatalogError, RangeError, get_range
from labelgen.catalog.fs import PROTOCOL, resolve_url
from labelgen.catalog.names import DatasetRef, InvalidName, parse_ref
from labelgen.contract import signatures
from labelgen.contract.format import MANIFEST_NAME, FormatError, join_url
from labelgen.contract.signatures import PrivateKey, PublicKey
from labelgen.contract.storage import write_json_atomic

__all__ = [
    "NEEDS",
    "TrustRefused",
    "TrustVerdict",
    "check_needs",
    "check_version",
    "check_url",
    "sign_version",
    "sign_url",
    "require_trusted",
    "trust_label",
    "verdict_lines",
    "catalog_trust_lines",
]

NEEDS = ("signed", "audited")
"""What a reader may require of a dataset (``data.require``, ``labelgen verify --require``)."""


class TrustRefused(Exception):
    """A dataset lacks what was required of it (or it could not be checked); the message
    names the dataset, what is missing and how to get it."""


@dataclass(frozen=True)
class TrustVerdict:
    """What vouches for one dataset, as checked here."""

    ref: str
    """``team/name@N`` (a catalog version) or the URL checked."""
    signed: bool
    """It has a signature this process verified and the catalog still counts."""
    audited: bool
    """The newest audit by its team (or an organisation admin) passed."""
    signatures: list[dict[str, Any]] = field(default_factory=list)
    """Each ``{"key_id", "signer", "name", "created_at", "valid", "reason"}``."""
    attestations: list[dict[str, Any]] = field(default_factory=list)
    """Newest first, each the catalog's attestation with ``trusted``."""
    problems: dict[str, str] = field(default_factory=dict)
    """For each of :data:`NEEDS` it lacks: why (``"has no valid signature: …"``)."""
    manifest_sha256: str = ""
    """The sha256 of the manifest bytes this process read."""

    def missing(self, needs: Iterable[str]) -> list[str]:
        """Those of ``needs`` it lacks."""
        return [need for need in check_needs(needs) if not getattr(self, need)]

    def refusal(self, needs: Iterable[str]) -> str | None:
        """Why it fails ``needs`` (None: it meets them)."""
        missing = self.missing(needs)
        if not missing:
            return None
        return f"{self.ref} " + "; and it ".join(self.problems[need] for need in missing)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_needs(needs: Iterable[str]) -> tuple[str, ...]:
    """``needs`` checked against :data:`NEEDS` (a comma-separated string is split)."""
    if isinstance(needs, str):
        needs = [n.strip() for n in needs.split(",") if n.strip()]
    out = tuple(dict.fromkeys(needs))
    unknown = [n for n in out if n not in NEEDS]
    if unknown:
        raise ValueError(
            f"cannot require {', '.join(repr(n) for n in unknown)} of a dataset; "
            f"the requirements are {', '.join(NEEDS)}"
        )
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- catalog versions


def _manifest_bytes(client: CatalogClient, ref: str | DatasetRef) -> bytes:
    """The bytes of ``ref``'s ``manifest.json``, fetched from where the catalog says it is."""
    answer = client.files(ref)
    entry = next((f for f in answer.get("files") or [] if f.get("path") == MANIFEST_NAME), None)
    if entry is None or not isinstance(entry.get("url"), str):
        raise FormatError(f"{ref}: the catalog lists no {MANIFEST_NAME} for it; is it a labelgen version?")
    try:
        return get_range(entry["url"], timeout=client.timeout).data
    except RangeError as exc:
        raise OSError(f"cannot read {MANIFEST_NAME} of {ref}: {exc.server_message or exc}") from exc


def _public_keys(keys: Iterable[PublicKey | str] | None) -> dict[str, PublicKey] | None:
    if keys is None:
        return None
    out = {}
    for key in keys:
        public = key if isinstance(key, PublicKey) else PublicKey(signatures.check_public_key(key))
        out[public.key_id] = public
    return out


def check_version(
    client: CatalogClient, ref: str | DatasetRef, keys: Iterable[PublicKey | str] | None = None
) -> TrustVerdict:
    """Check what vouches for catalog version ``ref`` (an alias resolves to its version now).

    Args:
        client: the catalog, with a token that may read ``ref``.
        ref: ``team/name@N`` (or an alias, or a :class:`DatasetRef`).
        keys: only signatures by these public keys count (default: the team's keys the
            catalog lists).

    Raises:
        CatalogError: the catalog refused (no such version, no read access) or is unreachable.
        OSError: the manifest could not be read.
    """
    pinned = _public_keys(keys)
    answer = client.trust(ref)
    resolved = str(answer.get("ref") or ref)
    team = str(answer.get("team") or parse_ref(resolved).team)
    published = str(answer.get("manifest_sha256") or "")
    digest = _sha256(_manifest_bytes(client, resolved))
    changed = (
        f"the {MANIFEST_NAME} read from storage hashes to {digest}, not the {published} it was published "
        "with: its storage changed after publish (ask its team to publish it again)"
        if digest != published
        else None
    )
    listed = {}
    for key in answer.get("keys") or []:
        try:
            if signatures.key_id_of(key.get("public_key")) == key.get("key_id"):
                listed[key["key_id"]] = key
        except signatures.SignatureError:
            continue
    checked = []
    for sig in answer.get("signatures") or []:
        key_id = str(sig.get("key_id"))
        key = listed.get(key_id) or {}
        public = key.get("public_key")
        reason = changed
        if pinned is not None:
            public = pinned[key_id].hex if key_id in pinned else None
            if public is None and reason is None:
                reason = f"its key {key_id} is not one of the keys given to check against"
        elif public is None and reason is None:
            reason = f"the catalog lists no public key {key_id} (or one that is not that key's)"
        if reason is None and not signatures.verify_digest(public, digest, str(sig.get("signature"))):
            reason = f"it does not verify over the manifest sha256 {digest} (checked here)"
        if reason is None and not sig.get("valid"):
            reason = str(sig.get("reason") or "the catalog does not count it")
        if reason is None and key.get("revoked_at"):
            reason = f"its key {key_id} was revoked at {key.get('revoked_at')}"
        checked.append(
            {
                "key_id": key_id,
                "name": key.get("name") or (pinned[key_id].name if pinned and key_id in pinned else ""),
                "signer": sig.get("signer"),
                "created_at": sig.get("created_at"),
                "valid": reason is None,
                "reason": reason,
            }
        )
    attestations = sorted(
        answer.get("attestations") or [],
        key=lambda a: (str(a.get("created_at")), a.get("id") or 0),
        reverse=True,
    )
    trusted = [a for a in attestations if a.get("trusted")]
    signed = any(s["valid"] for s in checked)
    audited = changed is None and bool(trusted) and trusted[0].get("passed") is True
    problems = {}
    if not signed:
        problems["signed"] = _unsigned(resolved, checked)
    if not audited:
        problems["audited"] = (
            f"has no passing audit by its team: {changed}"
            if changed
            else _unaudited(resolved, team, attestations, trusted)
        )
    return TrustVerdict(resolved, signed, audited, checked, attestations, problems, digest)


def _unsigned(ref: str, checked: Sequence[Mapping[str, Any]]) -> str:
    fix = f"(sign it with `labelgen sign {ref} --key KEY`)"
    if not checked:
        return f"has no valid signature: no signatures {fix}"
    why = "; ".join(f"key {s['key_id']} by {s['signer']}: {s['reason']}" for s in checked[:5])
    return f"has no valid signature: {len(checked)} signature(s), none valid ({why}) {fix}"


def _unaudited(
    ref: str, team: str, attestations: Sequence[Mapping[str, Any]], trusted: Sequence[Mapping[str, Any]]
) -> str:
    fix = f"(a member of team {team} audits it with `labelgen audit {ref} --rows 64 --attest`)"
    if not attestations:
        return f"has no passing audit by its team: no audits {fix}"
    if not trusted:
        outsiders = ", ".join(sorted({str(a.get("auditor")) for a in attestations}))
        return (
            f"has no passing audit by its team: {len(attestations)} audit(s) by {outsiders}, who are not "
            f"members of team {team} (shown, not trusted) {fix}"
        )
    newest = trusted[0]
    failure = newest.get("first_failure") or {}
    at = ", ".join(
        f"{what} {failure[what]}" for what in ("shard", "row", "position") if failure.get(what) is not None
    )
    check = f" ({failure['check']} check)" if failure.get("check") else ""
    reason = f": {failure['reason']}" if failure.get("reason") else ""
    return (
        f"has no passing audit by its team: the newest audit by {newest.get('auditor')} "
        f"({newest.get('created_at')}) failed{' at ' + at if at else ''}{check}{reason}"
    )


def sign_version(client: CatalogClient, ref: str | DatasetRef, key: PrivateKey) -> dict[str, Any]:
    """Sign catalog version ``ref`` with ``key`` (registered by the caller in its team): the
    manifest is read and hashed here, and signed only if it hashes to the version's sha256.

    Raises:
        TrustRefused: the manifest in storage is not the one published.
        CatalogError: the catalog refused the signature (not a writer, key not registered, …).
    """
    version = client.version(ref)
    resolved = str(version.get("ref") or ref)
    digest = _sha256(_manifest_bytes(client, resolved))
    if digest != version.get("manifest_sha256"):
        raise TrustRefused(
            f"not signing {resolved}: its {MANIFEST_NAME} in storage hashes to {digest}, not the "
            f"{version.get('manifest_sha256')} it was published with (its storage changed after publish)"
        )
    return client.sign_version(resolved, key.key_id, signatures.sign_digest(key, digest))


# --------------------------------------------------------------------------- plain URLs


def _plain_url(url: str, verb: str) -> tuple[Any, str]:
    if not isinstance(url, str) or url.startswith(f"{PROTOCOL}://"):
        raise ValueError(
            f"{url!r:.200} is a catalog version: {verb} it in the catalog (`labelgen {verb} team/name@N`)"
        )
    return fsspec.core.url_to_fs(url)


def _read_manifest_at(fs: Any, root: str, url: str) -> bytes:
    try:
        return bytes(fs.cat_file(join_url(root, MANIFEST_NAME)))
    except FileNotFoundError:
        raise FormatError(f"no {MANIFEST_NAME} at {url}: the dataset is incomplete or absent") from None


def sign_url(url: str, key: PrivateKey) -> tuple[str, signatures.DetachedSignature]:
    """Sign the dataset at plain ``url``: ``_signatures/KEY_ID.json`` beside its manifest
    (replaced if that key signed before). Returns (the file written, the signature)."""
    fs, root = _plain_url(url, "sign")
    digest = _sha256(_read_manifest_at(fs, root, url))
    detached = signatures.detached_signature(key, digest)
    path = signatures.signature_file(root, detached.key_id)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    write_json_atomic(fs, path, detached.to_json())
    return path, detached


def check_url(url: str, keys: Iterable[PublicKey | str] | None = None) -> TrustVerdict:
    """Verify the detached signatures of the dataset at plain ``url`` over its manifest.

    A signature file holds its own public key, so it proves only that *some* key signed
    these bytes: one counts when its key is among ``keys`` (the keys you trust). Audits
    live in the catalog only, so a plain URL is never ``audited``.
    """
    fs, root = _plain_url(url, "verify")
    pinned = _public_keys(keys) or {}
    digest = _sha256(_read_manifest_at(fs, root, url))
    directory = join_url(root, signatures.SIGNATURES_DIR)
    try:
        paths = sorted(p for p in fs.ls(directory, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        paths = []
    checked = []
    for path in paths:
        where = f"{url.rstrip('/')}/{signatures.SIGNATURES_DIR}/{path.rsplit('/', 1)[-1]}"
        entry: dict[str, Any] = {"file": where, "signer": None, "created_at": None, "name": ""}
        try:
            sig = signatures.parse_detached(bytes(fs.cat_file(path)), where)
        except signatures.SignatureError as exc:
            checked.append({**entry, "key_id": None, "valid": False, "reason": str(exc)})
            continue
        entry.update(key_id=sig.key_id, name=sig.name, created_at=sig.created_at)
        reason = None
        if path.rsplit("/", 1)[-1] != f"{sig.key_id}.json":
            reason = f"it is stored as {path.rsplit('/', 1)[-1]}, not {sig.key_id}.json"
        elif sig.manifest_sha256 != digest:
            reason = f"it signs manifest sha256 {sig.manifest_sha256}; the manifest there hashes to {digest}"
        elif not sig.verifies(digest):
            reason = f"it does not verify over manifest sha256 {digest} with its key {sig.key_id}"
        elif sig.key_id not in pinned:
            reason = (
                f"it verifies, but its key {sig.key_id} ({sig.name or 'unnamed'}) is not one you gave: "
                "pass --key PUBFILE with the keys you trust"
            )
        checked.append({**entry, "valid": reason is None, "reason": reason})
    signed = any(s["valid"] for s in checked)
    problems = {
        "audited": "has no passing audit: audits are recorded in the catalog only (publish it with "
        "`labelgen publish URL team/name`, then `labelgen audit team/name@N --attest`)"
    }
    if not signed:
        fix = f"(sign it with `labelgen sign {url} --key KEY`)"
        problems["signed"] = (
            f"has no valid signature: no signatures {fix}"
            if not checked
            else f"has no valid signature: {'; '.join(str(s['reason']) for s in checked[:5])} {fix}"
        )
    return TrustVerdict(url, signed, False, checked, [], problems, digest)


# --------------------------------------------------------------------------- the trainer's check


def require_trusted(url: str, needs: Sequence[str]) -> TrustVerdict:
    """The verdict on the dataset at ``url`` if it meets ``needs`` (⊆ :data:`NEEDS`).

    ``url`` is a ``labelgen://HOST/team/name@REF`` URL (an alias is resolved, and pinned
    for this process, as the reader of the URL resolves it), so what is checked is the
    version that is read. With no ``needs`` nothing is refused.

    Raises:
        TrustRefused: the version lacks a need (naming it and what is missing), it could
            not be checked (the catalog refused or is unreachable), or ``url`` is not a
            catalog version while something is required.
        ValueError: a need is not one of :data:`NEEDS`.
    """
    wanted = check_needs(needs)
    if not isinstance(url, str) or not url.startswith(f"{PROTOCOL}://"):
        if wanted:
            raise TrustRefused(
                f"{url!r:.200} is not a catalog version, so it cannot be required to be "
                f"{' and '.join(wanted)}: "
                "signatures and audits are recorded in the labelgen catalog; publish it "
                "(`labelgen publish URL team/name`) and read labelgen://HOST:PORT/team/name@N, "
                "or drop data.require"
            )
        return TrustVerdict(str(url), False, False, problems={"signed": "is not a catalog version"})
    try:
        ref, _, service = resolve_url(url)
        verdict = check_version(CatalogClient(service), ref)
    except (CatalogError, OSError, InvalidName, FormatError) as exc:
        if not wanted:
            raise
        raise TrustRefused(f"cannot check that {url} is {' and '.join(wanted)}: {exc}") from exc
    refusal = verdict.refusal(wanted)
    if refusal is not None:
        raise TrustRefused(refusal)
    return verdict


# --------------------------------------------------------------------------- printing


def trust_label(summary: Mapping[str, Any] | None) -> str:
    """A dataset row's TRUST column: ``signed+audited``, ``signed``, ``audited`` or ``-``."""
    if not summary:
        return "-"
    parts = [name for name in NEEDS if summary.get(name)]
    return "+".join(parts) or "-"


def verdict_lines(verdict: TrustVerdict) -> list[str]:
    """Readable lines: each signature and audit with its verdict, then the outcome."""
    lines = [f"{verdict.ref}: manifest sha256 {verdict.manifest_sha256} (read and hashed here)"]
    for s in verdict.signatures:
        name = f" {s['name']!r}" if s.get("name") else ""
        who = f" by {s['signer']}" if s.get("signer") else ""
        state = "valid" if s["valid"] else f"NOT valid: {s['reason']}"
        lines.append(f"  signature{who} (key {s.get('key_id')}{name}, {s.get('created_at')}): {state}")
    for a in verdict.attestations:
        outcome = "passed" if a.get("passed") else "FAILED"
        trust = "trusted" if a.get("trusted") else "not trusted: the auditor is not a member of the team"
        lines.append(
            f"  audit by {a.get('auditor')} ({a.get('created_at')}): {outcome}, {a.get('rows')} rows, "
            f"{a.get('positions')} positions ({trust})"
        )
    if not verdict.signatures and not verdict.attestations:
        lines.append("  no signatures, no audits")
    for need in NEEDS:
        state = "yes" if getattr(verdict, need) else f"no ({verdict.ref} {verdict.problems.get(need, '')})"
        lines.append(f"{need}: {state}")
    return lines


def catalog_trust_lines(answer: Mapping[str, Any]) -> list[str]:
    """Readable lines of a catalog's trust answer (``GET …/trust``): its own verdicts, which
    ``labelgen verify`` re-checks here."""
    signed = "signed" if answer.get("signed") else "not signed"
    audited = "audited" if answer.get("audited") else "not audited"
    check = f"`labelgen verify {answer.get('ref')}` checks here"
    lines = [f"trust: {signed}, {audited} (as the catalog sees it; {check})"]
    for s in answer.get("signatures") or []:
        state = "valid" if s.get("valid") else f"not valid: {s.get('reason')}"
        lines.append(
            f"  signature by {s.get('signer')} (key {s.get('key_id')}, {s.get('created_at')}): {state}"
        )
    for a in answer.get("attestations") or []:
        outcome = "passed" if a.get("passed") else "FAILED"
        trusted = "trusted" if a.get("trusted") else "not trusted: auditor outside the team"
        lines.append(
            f"  audit by {a.get('auditor')} ({a.get('created_at')}): {outcome}, {a.get('rows')} rows, "
            f"{a.get('positions')} positions ({trusted})"
        )
        failure = a.get("first_failure") or {}
        if not a.get("passed") and failure:
            lines.append(f"    first failure: {failure.get('check')} {failure.get('reason')}")
    return lines
