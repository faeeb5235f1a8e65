"""The ``labelgen`` trust verbs (argparse subcommands and handlers)::

    labelgen keys new --out PATH [--name N]            an ed25519 key pair: PATH (0600) and PATH.pub
    labelgen keys register TEAM PUBFILE [--name N]      let the key sign TEAM's versions (writers)
    labelgen keys list TEAM [--json]                    TEAM's keys, revoked ones included
    labelgen keys revoke TEAM KEY_ID                    its signatures stop counting
    labelgen sign team/name@N --key PRIVATE_KEY         sign a catalog version's manifest
    labelgen sign URL --key PRIVATE_KEY                 a detached signature beside a dataset
    labelgen verify team/name@N | URL [--key PUBFILE] [--require signed,audited] [--json]

``verify`` exits 0 when the dataset meets ``--require`` (default: signed), 1 when it does
not, 2 when it could not be checked (refused, unreadable, a mistaken argument).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from labelgen.catalog import trust
from labelgen.catalog.cli_common import client_of, group, leaf, print_json, service_of, table
from labelgen.catalog.client import CatalogClient, CatalogError, service_for
from labelgen.catalog.fs import PROTOCOL, split_path
from labelgen.catalog.names import DatasetRef, InvalidName, check_name, parse_ref
from labelgen.contract import signatures
from labelgen.contract.format import FormatError

__all__ = ["add_commands"]


def add_commands(sub: Any) -> None:
    """Add the trust verbs to ``sub`` (argparse subparsers)."""
    verbs = group(sub, "keys", "make, register, list and revoke signing keys")
    p = leaf(
        verbs, "new", _keys_new, "make an ed25519 key pair: PATH (private, 0600) and PATH.pub", service=False
    )
    p.add_argument(
        "--out", required=True, metavar="PATH", help="where the private key goes (PATH.pub: public)"
    )
    p.add_argument("--name", default=None, help="what the key is (default: from PATH), e.g. laptop, ci")
    p = leaf(verbs, "register", _keys_register, "let a public key sign a team's versions (its writers)")
    p.add_argument("team")
    p.add_argument("pubfile", metavar="PUBFILE", help="the PATH.pub `labelgen keys new` wrote")
    p.add_argument("--name", default=None, help="the key's name in the catalog (default: the file's)")
    p = leaf(verbs, "list", _keys_list, "a team's signing keys (revoked ones included)")
    p.add_argument("team")
    p.add_argument("--json", action="store_true", help="print the service's JSON")
    p = leaf(verbs, "revoke", _keys_revoke, "revoke a key: signatures made with it stop counting")
    p.add_argument("team")
    p.add_argument("key_id", metavar="KEY_ID")

    p = leaf(sub, "sign", _sign, "sign a catalog version (team/name@N) or a dataset URL (detached file)")
    p.add_argument("target", metavar="team/name@N | URL")
    p.add_argument(
        "--key", required=True, metavar="PRIVATE_KEY", help="the private key file (keys new --out)"
    )

    p = leaf(sub, "verify", _verify, "check a version's (or URL's) signatures and audits; exit 0/1/2")
    p.add_argument("target", metavar="team/name@N | URL")
    p.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="PUBFILE",
        help="count only signatures by this public key (repeatable; needed for plain URLs)",
    )
    p.add_argument(
        "--require",
        default="signed",
        metavar="NEEDS",
        help="what it must be: signed, audited or signed,audited (default: signed)",
    )
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")


def _user_errors(handler: Any) -> Any:
    """``handler`` with the mistakes a user can make here printed as errors (exit 2)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(handler(args))
        except (signatures.SignatureError, trust.TrustRefused, FormatError, FileExistsError) as exc:
            print(f"labelgen {getattr(args, 'command', 'keys')}: error: {exc}", file=sys.stderr)
            return 2

    run.__doc__ = handler.__doc__
    return run


# --------------------------------------------------------------------------- keys


def _default_name(path: str) -> str:
    stem = re.sub(r"[^a-z0-9_.-]+", "-", os.path.basename(path).lower()).strip("-_.")
    return stem[:64] or "key"


@_user_errors
def _keys_new(args: argparse.Namespace) -> int:
    name = check_name("key name", args.name) if args.name is not None else _default_name(args.out)
    key = signatures.new_key(name)
    private, public = signatures.save_key(key, args.out)
    print(
        f"key {key.key_id} ({name}): private key {private} (mode 0600, keep it secret), public key {public}"
    )
    print(f"  register it: labelgen keys register TEAM {public}")
    return 0


@_user_errors
def _keys_register(args: argparse.Namespace) -> int:
    public = signatures.load_public_key(args.pubfile)
    name = args.name or public.name or _default_name(args.pubfile.removesuffix(".pub"))
    key = client_of(args).register_key(args.team, public.hex, name)
    print(
        f"key {key.get('key_id')} ({key.get('name')}) registered for team {args.team}, "
        f"owned by {key.get('owner')}"
    )
    print(f"  sign with it: labelgen sign {args.team}/NAME@N --key {args.pubfile.removesuffix('.pub')}")
    return 0


@_user_errors
def _keys_list(args: argparse.Namespace) -> int:
    keys = client_of(args).list_keys(args.team)
    if args.json:
        print_json(keys)
        return 0
    if not keys:
        print(
            f"team {args.team} has no signing keys; "
            f"register one with `labelgen keys register {args.team} KEY.pub`"
        )
        return 0
    rows = [
        (k.get("key_id"), k.get("name"), k.get("owner"), k.get("created_at"), k.get("revoked_at") or "-")
        for k in keys
    ]
    table(("KEY_ID", "NAME", "OWNER", "CREATED", "REVOKED"), rows)
    return 0


@_user_errors
def _keys_revoke(args: argparse.Namespace) -> int:
    key = client_of(args).revoke_key(args.team, args.key_id)
    print(f"key {args.key_id} of team {args.team} revoked at {(key or {}).get('revoked_at')}")
    return 0


# --------------------------------------------------------------------------- sign, verify


def _target(args: argparse.Namespace) -> tuple[CatalogClient | None, DatasetRef | None, str]:
    """(client, ref, '') for a catalog version, (None, None, url) for a plain URL."""
    text = args.target
    if text.startswith(f"{PROTOCOL}://"):
        netloc, ref, rel, _ = split_path(text)
        if rel:
            raise InvalidName(f"{text} names a file inside {ref}; give the version itself")
        return CatalogClient(service_for(netloc)), ref, ""
    if "://" in text or os.path.exists(text):
        return None, None, text
    return CatalogClient(service_of(args)), parse_ref(text), ""


@_user_errors
def _sign(args: argparse.Namespace) -> int:
    key = signatures.load_private_key(args.key)
    client, ref, url = _target(args)
    if client is not None and ref is not None:
        if ref.version is None:
            print(f"signing {ref}, which names a version by alias: the version it names now", file=sys.stderr)
        done = trust.sign_version(client, ref, key)
        print(f"signed {done.get('ref')} with key {key.key_id} ({key.name or 'unnamed'})")
        return 0
    path, detached = trust.sign_url(url, key)
    print(f"signed {url} (manifest sha256 {detached.manifest_sha256}) with key {key.key_id}: {path}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    try:
        needs = trust.check_needs(args.require)
        keys = [signatures.load_public_key(k) for k in args.key] or None
        client, ref, url = _target(args)
        if client is not None and ref is not None:
            verdict = trust.check_version(client, ref, keys)
        else:
            verdict = trust.check_url(url, keys)
    except (ValueError, OSError, FormatError, CatalogError, InvalidName) as exc:
        print(f"labelgen verify: error: {exc}", file=sys.stderr)
        return 2
    refusal = verdict.refusal(needs)
    if args.json:
        print_json({**verdict.to_json(), "required": list(needs), "ok": refusal is None})
    else:
        for line in trust.verdict_lines(verdict):
            print(line)
        print(f"verdict: {'OK' if refusal is None else 'NOT OK'} (required: {', '.join(needs) or 'nothing'})")
    return 0 if refusal is None else 1
