"""Validation of the names that end up inside store keys.

Namespaces, services and UIDs are embedded in Redis keys such as
``sf:{<ns>:lk:<uid>}<svc>``. A ``{`` or ``}`` would move the key to another
Redis Cluster slot and a control character could change the key itself, so
such values are rejected here instead of being escaped.
"""

from __future__ import annotations

import re
from typing import Final

UID_MAX_LENGTH: Final = 128
DNS_LABEL_MAX_LENGTH: Final = 63

# The characters of a UID: printable ASCII without space (0x21-0x7E), minus
# the hash tag braces.
_UID_CHARACTERS: Final = "".join(
    chr(code) for code in range(0x21, 0x7F) if chr(code) not in "{}"
)
# RFC 1123 label, as Kubernetes uses for namespaces and service names.
_DNS_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def uid_problem(uid: str) -> str | None:
    """Return why `uid` is not a valid UID, or None when it is valid."""
    if not uid:
        return "is empty"
    if len(uid) > UID_MAX_LENGTH:
        return f"is {len(uid)} characters long, the maximum is {UID_MAX_LENGTH}"
    # `strip` removes the UID characters from both ends, so any other
    # character is left over. It costs less than a regular expression
    # match, both compiled (mypyc calls it directly) and interpreted.
    if uid.strip(_UID_CHARACTERS):
        return (
            "must be printable ASCII without whitespace, '{', '}' or control characters"
        )
    return None


def dns_label_problem(name: str) -> str | None:
    """Return why `name` is not an RFC 1123 DNS label, or None when it is one."""
    if not name:
        return "is empty"
    if len(name) > DNS_LABEL_MAX_LENGTH:
        return f"is {len(name)} characters long, the maximum is {DNS_LABEL_MAX_LENGTH}"
    if _DNS_LABEL_RE.fullmatch(name) is None:
        return (
            "must be a DNS label: lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return None
