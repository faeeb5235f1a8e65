"""The ``labelgen`` verbs that talk to the catalog service (argparse subcommands and handlers).

    labelgen login HOST[:PORT] [--token TOKEN]            check a token, store it (mode 0600)
    labelgen publish URL team/name [--alias A ...] [--job-spec FILE]
    labelgen datasets list [filters] [--compatible-with TOKENIZER_DIR] [--json]
    labelgen datasets show team/name[@ref] [--json]
    labelgen token create [--name N] [--expires-days D] [--user U] | token list | token revoke ID
    labelgen teams create NAME | teams add-member TEAM USER --role R | teams remove-member TEAM USER
    labelgen alias set team/name ALIAS VERSION | alias delete team/name ALIAS
    labelgen share team/name GRANTEE | unshare team/name GRANTEE   (GRANTEE: a team, or '*')
    labelgen audit-log [--team T] [--action A] [--limit N] [--json]
    labelgen keys new|register|list|revoke | sign | verify   signatures (trust_commands)
    labelgen jobs list|show                                  jobs the service runs (job_commands)

Every verb but ``login`` takes ``--service HOST:PORT`` (default ``$LABELGEN_SERVICE``, else
the last ``labelgen login``). Wiring into ``labelgen.cli``: :func:`add_commands` on its
subparsers, :data:`COMMANDS` the verbs it adds, :func:`run` their handler, and
:data:`USER_ERRORS` the exceptions to print as ``labelgen VERB: error: message`` (exit 2).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from labelgen.catalog.cli_common import (
    catalog_url,
    client_of,
    group,
    leaf,
    print_json,
    size,
    table,
)
from labelgen.catalog.client import (
    CatalogClient,
    CatalogError,
    parse_service,
    save_login,
)
from labelgen.catalog.names import InvalidName, check_name, new_token, parse_ref
from labelgen.catalog.trust import TrustRefused, catalog_trust_lines, trust_label
from labelgen.contract.signatures import SignatureError
from labelgen.contract.storage import MIB

__all__ = ["COMMANDS", "USER_ERRORS", "add_commands", "run", "card_lines", "catalog_url"]

COMMANDS = (
    "login",
    "publish",
    "datasets",
    "token",
    "teams",
    "alias",
    "share",
    "unshare",
    "audit-log",
    "keys",
    "sign",
    "verify",
    "jobs",
)
"""The top-level verbs :func:`add_commands` adds."""
USER_ERRORS: tuple[type[Exception], ...] = (CatalogError, InvalidName, SignatureError, TrustRefused)
"""Exceptions a verb raises for a refused or mistaken request: print, exit 2."""


# --------------------------------------------------------------------------- parsers


def add_commands(sub: Any) -> None:
    """Add the catalog verbs to ``sub`` (an argparse subparsers object); each leaf parser sets
    ``catalog_handler``, which :func:`run` calls."""
    _add_login(sub)
    _add_publish(sub)
    _add_datasets(sub)
    _add_token(sub)
    _add_teams(sub)
    _add_alias(sub)
    _add_share(sub)
    _add_audit(sub)
    from labelgen.catalog import job_commands, trust_commands

    trust_commands.add_commands(sub)
    job_commands.add_commands(sub)


def _add_login(sub: Any) -> None:
    p = leaf(sub, "login", _login, "store a token for a catalog service (checked first)", service=False)
    p.add_argument("service", metavar="HOST[:PORT]", help="the service, e.g. catalog.internal:8470")
    p.add_argument(
        "--token",
        default=None,
        help="the token (default: read from stdin, or asked for without echo; "
        "a token on the command line is visible to other users of the machine)",
    )


def _add_publish(sub: Any) -> None:
    p = leaf(sub, "publish", _publish, "verify a finished label dataset and register it as a new version")
    p.add_argument("url", help="the dataset's URL (s3://..., or a path the service can read)")
    p.add_argument("dataset", metavar="team/name", help="the catalog dataset it becomes a version of")
    p.add_argument("--alias", action="append", default=[], help="also point this alias at it (repeatable)")
    p.add_argument("--job-spec", default=None, metavar="FILE", help="the job spec to record with it")


def _add_datasets(sub: Any) -> None:
    verbs = group(sub, "datasets", "list and show catalog datasets")
    p = leaf(verbs, "list", _datasets_list, "datasets you can read, filtered")
    p.add_argument("--team", default=None)
    p.add_argument("--name", default=None)
    p.add_argument("--teacher", default=None, help="teacher model (substring)")
    p.add_argument("--tokenizer", default=None, metavar="FP", help="tokenizer fingerprint (sha256)")
    p.add_argument("--k", type=int, default=None, help="top-k width")
    p.add_argument("--products", default=None, help="products it must have, comma-separated (draws,hidden)")
    p.add_argument("--min-tokens", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--min-bytes", type=int, default=None, help="at least this many bytes (latest version)")
    p.add_argument("--max-bytes", type=int, default=None, help="at most this many bytes (latest version)")
    p.add_argument(
        "--compatible-with",
        default=None,
        metavar="TOKENIZER_DIR",
        help="only datasets labelled with this (student) tokenizer's vocabulary (needs transformers)",
    )
    p.add_argument("--json", action="store_true", help="print the service's JSON")
    p = leaf(verbs, "show", _datasets_show, "a dataset's versions, aliases and shares, or one version")
    p.add_argument("ref", metavar="team/name[@ref]", help="a dataset, or one version of it (@3, @stable)")
    p.add_argument("--json", action="store_true", help="print the service's JSON")


def _add_token(sub: Any) -> None:
    verbs = group(sub, "token", "create, list and revoke access tokens")
    p = leaf(verbs, "create", _token_create, "a new token (printed once)")
    p.add_argument("--name", default=None, help="what it is for (e.g. laptop, ci)")
    p.add_argument("--expires-days", type=int, default=None, help="days until it expires (default: never)")
    p.add_argument("--user", default=None, help="create it for this user (org admins)")
    leaf(verbs, "list", _token_list, "tokens you can see (no secrets)")
    leaf(
        verbs,
        "new",
        _token_new,
        "print a fresh random token and store nothing (for LABELGEN_BOOTSTRAP_TOKEN in a Secret)",
        service=False,
    )
    p = leaf(verbs, "revoke", _token_revoke, "revoke a token")
    p.add_argument("id", type=int, help="the token's id (`labelgen token list`)")


def _add_teams(sub: Any) -> None:
    verbs = group(sub, "teams", "create teams and manage their members")
    p = leaf(verbs, "create", _teams_create, "create a team (org admins)")
    p.add_argument("name")
    p = leaf(verbs, "add-member", _teams_add, "give a user a role in a team (team admins; creates the user)")
    p.add_argument("team")
    p.add_argument("user")
    p.add_argument("--role", required=True, choices=("reader", "writer", "admin"))
    p = leaf(verbs, "remove-member", _teams_remove, "remove a user from a team")
    p.add_argument("team")
    p.add_argument("user")


def _add_alias(sub: Any) -> None:
    verbs = group(sub, "alias", "point aliases (stable, ...) at versions")
    p = leaf(verbs, "set", _alias_set, "point an alias at a version")
    p.add_argument("dataset", metavar="team/name")
    p.add_argument("alias")
    p.add_argument("version", type=int)
    p = leaf(verbs, "delete", _alias_delete, "remove an alias")
    p.add_argument("dataset", metavar="team/name")
    p.add_argument("alias")


def _add_share(sub: Any) -> None:
    for verb, handler, text in (
        ("share", _share, "let another team (or '*': everyone) read a dataset"),
        ("unshare", _unshare, "withdraw a share"),
    ):
        p = leaf(sub, verb, handler, text)
        p.add_argument("dataset", metavar="team/name")
        p.add_argument("grantee", metavar="GRANTEE", help="a team name, or '*' for the whole organisation")


def _add_audit(sub: Any) -> None:
    p = leaf(sub, "audit-log", _audit, "the audit log (org admins: all; team admins: their teams)")
    p.add_argument("--team", default=None)
    p.add_argument("--action", default=None, help="only this action (e.g. publish, alias.move)")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true", help="print the service's JSON")


# --------------------------------------------------------------------------- running


def _token_new(args: argparse.Namespace) -> int:
    print(new_token())
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the catalog verb ``args`` was parsed for; the exit status."""
    return int(args.catalog_handler(args))


# --------------------------------------------------------------------------- login, publish


def _read_token(service: str) -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().strip()
    return getpass.getpass(f"token for {service}: ").strip()


def _login(args: argparse.Namespace) -> int:
    key = parse_service(args.service).key
    token = args.token if args.token is not None else _read_token(key)
    if not token:
        raise CatalogError(
            None, "no_token", f"no token given for {key}; create one with `labelgen token create`"
        )
    me = CatalogClient(args.service, token=token).whoami()
    path = save_login(args.service, token)
    teams = me.get("teams") or {}
    roles = ", ".join(f"{team} ({role})" for team, role in sorted(teams.items())) or "none"
    admin = " (org admin)" if me.get("admin") else ""
    print(f"logged in to {key} as {me.get('user')}{admin}; teams: {roles}")
    print(f"token stored in {path} (mode 0600); {key} is now the default service")
    return 0


def _publish(args: argparse.Namespace) -> int:
    dataset = _dataset_only(args.dataset, "publish")
    url = args.url if "://" in args.url else os.path.abspath(os.path.expanduser(args.url))
    job_spec = None
    if args.job_spec is not None:
        try:
            with open(args.job_spec, encoding="utf-8") as f:
                job_spec = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise CatalogError(None, "job_spec", f"cannot read --job-spec {args.job_spec}: {exc}") from None
    print(
        f"publishing {url} as {dataset}: the service checks the manifest, the commit records and "
        "every shard's size and sha256 (as long as reading the dataset once) ...",
        file=sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    version = client_of(args).publish(dataset, url, aliases=args.alias, job_spec=job_spec)
    aliases = ", ".join(version.get("aliases") or []) or "none besides latest"
    verb = "already published as" if version.get("existing") else "published"
    print(
        f"{verb} {version.get('ref')}: {version.get('files')} files, {size(version.get('bytes'))} "
        f"(verified in {time.monotonic() - started:.1f}s)"
    )
    print(f"  aliases: {aliases}")
    for line in card_lines(version.get("card") or {}):
        print(f"  {line}")
    return 0


def _dataset_only(text: str, verb: str) -> str:
    """``team/name`` (no ref) checked; ``verb`` names the command in the error."""
    if "@" in text:
        raise InvalidName(
            f"{verb} takes team/name without a ref, got {text!r:.100}; the catalog numbers versions"
        )
    return parse_ref(text).dataset


def card_lines(card: Mapping[str, Any]) -> list[str]:
    """A dataset card (labelgen.service.verify's) as short ``key: value`` lines."""
    teacher, tok = card.get("teacher") or {}, card.get("tokenizer") or {}
    weights = teacher.get("weights") or {}
    products = []
    if card.get("draws"):
        products.append(f"draws {card['draws']}")
    if card.get("hidden_layers"):
        products.append(f"hidden layers {', '.join(str(x) for x in card['hidden_layers'])}")
    lines = [
        f"teacher: {teacher.get('model')} ({teacher.get('dtype')}, vLLM {teacher.get('vllm_version')}); "
        f"weights {weights.get('mode')} sha256 {str(weights.get('sha256'))[:16]}…",
        f"tokenizer: {tok.get('fingerprint')} (vocab {tok.get('vocab_size')}, model vocab "
        f"{tok.get('model_vocab_size')})",
        f"labels: top-{card.get('k')} ({card.get('codec')}); products: {', '.join(products) or 'top-k only'}",
        f"size: {card.get('sequences')} sequences, {card.get('tokens')} tokens, "
        f"{(card.get('bytes') or 0) / MIB:.1f} MiB, "
        f"{card.get('bytes_per_token') or 0:.1f} bytes per label position",
    ]
    rejected = card.get("rejected") or {}
    lines.append(f"rejected: {', '.join(f'{k}={v}' for k, v in sorted(rejected.items())) or 'none'}")
    stats = card.get("stats") or {}
    if stats.get("entropy_nats") is not None:
        lines.append(
            f"teacher stats: entropy {stats['entropy_nats']:.3f} nats (top-k + tail), top-1 mass "
            f"{stats['top1_mass']:.3f}, tail mass {stats['tail_mass']:.3f} "
            f"({stats.get('sample_rows')} sequences)"
        )
    return lines


# --------------------------------------------------------------------------- datasets


def _datasets_list(args: argparse.Namespace) -> int:
    tokenizer = args.tokenizer
    if args.compatible_with is not None:
        fingerprint = _fingerprint(args.compatible_with)
        if tokenizer is not None and tokenizer != fingerprint:
            raise CatalogError(
                None,
                "conflicting_filters",
                f"--tokenizer {tokenizer:.16}... and --compatible-with {args.compatible_with} (fingerprint "
                f"{fingerprint[:16]}...) disagree; pass one of them",
            )
        tokenizer = fingerprint
    datasets = client_of(args).list_datasets(
        team=args.team,
        name=args.name,
        teacher=args.teacher,
        tokenizer=tokenizer,
        k=args.k,
        products=args.products,
        min_tokens=args.min_tokens,
        max_tokens=args.max_tokens,
        min_bytes=args.min_bytes,
        max_bytes=args.max_bytes,
    )
    if args.json:
        print_json(datasets)
        return 0
    if not datasets:
        print("no datasets match (or none are shared with you)")
        return 0
    rows = []
    for item in datasets:
        latest = item.get("latest") or {}
        card = latest.get("card") or {}
        aliases = item.get("aliases") or {}
        rows.append(
            (
                latest.get("ref") or f"{item.get('team')}/{item.get('name')} (no versions)",
                str((card.get("teacher") or {}).get("model", "")),
                card.get("k", ""),
                ",".join(sorted(name for name, value in (card.get("products") or {}).items() if value))
                or "-",
                card.get("tokens", ""),
                size(latest.get("bytes")) if latest else "",
                trust_label(item.get("trust") or latest.get("trust")),
                ", ".join(f"{a}={v}" for a, v in sorted(aliases.items()) if a != "latest"),
            )
        )
    table(("REF", "TEACHER", "K", "PRODUCTS", "TOKENS", "SIZE", "TRUST", "ALIASES"), rows)
    return 0


def _fingerprint(directory: str) -> str:
    """The tokenizer fingerprint of the tokenizer saved in ``directory``."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CatalogError(
            None,
            "missing_dependency",
            "--compatible-with loads the tokenizer with transformers, which is not installed: "
            "pip install 'labelgen[student]' (or pass --tokenizer FINGERPRINT)",
        ) from None
    from labelgen.contract.format import tokenizer_fingerprint

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise CatalogError(
            None,
            "tokenizer",
            f"cannot load a tokenizer from {directory!r:.200}: {exc}; pass the student's tokenizer or "
            "model directory",
        ) from None
    return tokenizer_fingerprint(tokenizer)


def _datasets_show(args: argparse.Namespace) -> int:
    ref = parse_ref(args.ref)
    client = client_of(args)
    if "@" in args.ref:
        version = client.version(ref)
        if args.json:
            print_json(version)
        else:
            _print_version(version)
            try:
                lines = catalog_trust_lines(client.trust(version.get("ref") or ref))
            except CatalogError as exc:  # a service without the trust routes: the rest is shown
                lines = [f"trust: unknown ({exc})"]
            for line in lines:
                print(f"  {line}")
        return 0
    dataset = client.dataset(ref)
    if args.json:
        print_json(dataset)
        return 0
    aliases = dataset.get("aliases") or {}
    shares = ", ".join(dataset.get("shares") or []) or "none (its team only)"
    print(
        f"{dataset.get('team')}/{dataset.get('name')}: created {dataset.get('created_at')} "
        f"by {dataset.get('created_by')}"
    )
    print(f"  aliases: {', '.join(f'{a} -> {v}' for a, v in sorted(aliases.items())) or 'none'}")
    print(f"  shared with: {shares}")
    versions = dataset.get("versions") or []
    if not versions:
        print("  no versions yet: `labelgen publish URL team/name`")
        return 0
    rows = [
        (
            v.get("version"),
            size(v.get("bytes")),
            v.get("files"),
            v.get("published_by"),
            v.get("created_at"),
            trust_label(v.get("trust")),
            ", ".join(v.get("aliases") or []),
            v.get("url"),
        )
        for v in versions
    ]
    table(("VERSION", "SIZE", "FILES", "BY", "CREATED", "TRUST", "ALIASES", "URL"), rows)
    return 0


def _print_version(version: Mapping[str, Any]) -> None:
    print(f"{version.get('ref')}: {version.get('files')} files, {size(version.get('bytes'))}")
    print(f"  url: {version.get('url')}")
    print(f"  manifest sha256: {version.get('manifest_sha256')}")
    print(f"  published by {version.get('published_by')} at {version.get('created_at')}")
    print(f"  aliases: {', '.join(version.get('aliases') or []) or 'none'}")
    for line in card_lines(version.get("card") or {}):
        print(f"  {line}")
    runs = version.get("runs") or []
    if runs:
        print(f"  trained on by {len(runs)} run(s):")
        for r in runs:
            print(f"    {r.get('id')}: {r.get('name')} ({r.get('user')}, {r.get('created_at')})")


# --------------------------------------------------------------------------- tokens, teams


def _token_create(args: argparse.Namespace) -> int:
    created = client_of(args).create_token(name=args.name, expires_days=args.expires_days, user=args.user)
    expires = created.get("expires_at") or "never"
    print(
        f"token {created.get('id')} for {created.get('user')} ({created.get('name') or 'unnamed'}), "
        f"expires {expires}:"
    )
    print(created.get("token"))
    print("store it now: it is not shown again (use it with `labelgen login HOST:PORT` or $LABELGEN_TOKEN)")
    return 0


def _token_list(args: argparse.Namespace) -> int:
    tokens = client_of(args).list_tokens()
    if not tokens:
        print("no tokens")
        return 0
    rows = [
        (
            t.get("id"),
            t.get("user"),
            t.get("name"),
            t.get("prefix"),
            t.get("created_at"),
            t.get("expires_at"),
            t.get("revoked_at"),
        )
        for t in tokens
    ]
    table(("ID", "USER", "NAME", "PREFIX", "CREATED", "EXPIRES", "REVOKED"), rows)
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    client_of(args).revoke_token(args.id)
    print(f"token {args.id} revoked")
    return 0


def _teams_create(args: argparse.Namespace) -> int:
    client_of(args).create_team(args.name)
    print(
        f"team {args.name} created; add members with "
        f"`labelgen teams add-member {args.name} USER --role admin`"
    )
    return 0


def _teams_add(args: argparse.Namespace) -> int:
    client_of(args).set_member(args.team, args.user, args.role)
    print(f"{args.user} is {args.role} of {args.team}")
    return 0


def _teams_remove(args: argparse.Namespace) -> int:
    client_of(args).remove_member(args.team, args.user)
    print(f"{args.user} removed from {args.team}")
    return 0


# --------------------------------------------------------------------------- aliases, shares, audit


def _alias_set(args: argparse.Namespace) -> int:
    dataset = _dataset_only(args.dataset, "alias set")
    check_name("alias", args.alias)
    client_of(args).set_alias(dataset, args.alias, args.version)
    print(f"{dataset}@{args.alias} -> version {args.version}")
    return 0


def _alias_delete(args: argparse.Namespace) -> int:
    dataset = _dataset_only(args.dataset, "alias delete")
    client_of(args).delete_alias(dataset, args.alias)
    print(f"alias {args.alias} of {dataset} deleted")
    return 0


def _share(args: argparse.Namespace) -> int:
    dataset = _dataset_only(args.dataset, "share")
    client_of(args).share(dataset, args.grantee)
    who = "everyone in the organisation" if args.grantee == "*" else f"team {args.grantee}"
    print(f"{dataset} is readable by {who}")
    return 0


def _unshare(args: argparse.Namespace) -> int:
    dataset = _dataset_only(args.dataset, "unshare")
    client_of(args).unshare(dataset, args.grantee)
    print(f"{dataset} is no longer shared with {args.grantee}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    events = client_of(args).audit(team=args.team, action=args.action, limit=args.limit)
    if args.json:
        print_json(events)
        return 0
    if not events:
        print("no audit events")
        return 0
    known = ("at", "created_at", "actor", "action", "team", "target", "outcome")
    rows = []
    for e in events:
        detail = {k: v for k, v in e.items() if k not in (*known, "id")}
        rows.append(
            (
                e.get("at") or e.get("created_at"),
                e.get("actor"),
                e.get("action"),
                e.get("team"),
                e.get("target"),
                e.get("outcome"),
                json.dumps(detail, sort_keys=True) if detail else "",
            )
        )
    table(("AT", "USER", "ACTION", "TEAM", "TARGET", "OUTCOME", "DETAIL"), rows)
    return 0
