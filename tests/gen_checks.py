"""User checks for the generation tests, imported by path (``gen_checks:even_tokens``)."""

from __future__ import annotations


def even_tokens(sample) -> tuple[bool, str | None]:
    """Accept responses of an even number of tokens."""
    if len(sample.token_ids) % 2 == 0:
        return True, None
    return False, f"{len(sample.token_ids)} tokens"
