"""Who may do what in the catalog: roles and the access rules, in one place.

Roles rank ``reader < writer < admin`` within a team. An action on a dataset needs:

=========  ==========================================================================
action     allowed for
=========  ==========================================================================
read       any member of the owning team; members of a team it is shared with; every
           signed-in user when it is shared org-wide (``*``); organisation admins
publish    writers and admins of the owning team (a new version, a new dataset)
alias      writers and admins of the owning team (move or delete an alias)
grant      admins of the owning team (share or unshare); team admins also manage members
sign       writers and admins of the owning team (register a signing key, sign a version)
attest     anyone who may read it (an audit by someone outside the owning team is shown,
           but only the owning team's members' and organisation admins' audits are trusted)
submit     writers and admins of the team the job publishes into
=========  ==========================================================================

Sharing gives read access only: a team a dataset is shared with cannot publish, move
aliases or re-share it. Organisation admins (``users.is_admin``, the bootstrap user)
may do everything. This module is pure (no database, no web framework): the store asks
:func:`allowed` with what it looked up, and the docs' table is this one.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

__all__ = ["ROLES", "ACTIONS", "check_role", "rank", "allowed", "needed_role"]

ROLES = ("reader", "writer", "admin")
"""Team roles, weakest first."""
ACTIONS = ("read", "publish", "alias", "grant", "sign", "attest", "submit")
_NEEDS = {
    "read": "reader",
    "publish": "writer",
    "alias": "writer",
    "grant": "admin",
    "sign": "writer",
    "attest": "reader",
    "submit": "writer",
}


def check_role(role: object) -> str:
    """``role`` if it is a team role, else ValueError naming the choices."""
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not a team role; use one of {', '.join(ROLES)}")
    return str(role)


def rank(role: str | None) -> int:
    """0 for no role, then 1 (reader), 2 (writer), 3 (admin)."""
    return ROLES.index(role) + 1 if role in ROLES else 0


def needed_role(action: str) -> str:
    """The weakest role in the owning team that may do ``action``."""
    return _NEEDS[action]


def allowed(
    action: str,
    owner: str,
    roles: Mapping[str, str],
    shares: Collection[str] = (),
    org_admin: bool = False,
) -> bool:
    """May a user with ``roles`` (team → role) do ``action`` on a dataset of team ``owner``
    shared with ``shares`` (team names, ``*`` for everyone)?"""
    assert action in _NEEDS, action
    if org_admin:
        return True
    if rank(roles.get(owner)) >= rank(_NEEDS[action]):
        return True
    if action in ("read", "attest"):
        return "*" in shares or any(team in roles for team in shares)
    return False
