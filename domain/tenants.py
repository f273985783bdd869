"""What a tenant's name may be: one rule for every door that names a tenant and for the ledger.

Why a rule at all: a tenant's name names its hash chain, and each signed checkpoint of that
chain carries the name in a C2SP note's origin line, which can hold no control character. A
door that let such a name in (an API key issued by the CLI, an OIDC tenant claim) would admit
requests whose audit records no checkpoint could ever cover; the ledger refuses them too.
"""

from __future__ import annotations

import re

CONTROL = re.compile("[\x00-\x1f]")


def tenant_problem(tenant: object) -> str | None:
    """Why `tenant` cannot name a tenant, or None when it can."""
    if not isinstance(tenant, str) or not tenant.strip():
        return "a tenant's name must be a non-blank string"
    if CONTROL.search(tenant) is not None:
        return f"the tenant name {tenant!r} has a control character (a checkpoint could not name its chain)"
    return None
