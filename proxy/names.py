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

# A UID is printable ASCII without space (0x21-0x7E), minus the hash tag
# braces. Final, so that mypyc puts the numbers in the code.
_UID_MIN_CODE: Final = 0x21
_UID_MAX_CODE: Final = 0x7E
_OPEN_BRACE: Final = 0x7B
_CLOSE_BRACE: Final = 0x7D
# RFC 1123 label, as Kubernetes uses for namespaces and service names.
_DNS_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def uid_problem(uid: str) -> str | None:
    """Return why `uid` is not a valid UID, or None when it is valid."""
    if not uid:
        return "is empty"
    if len(uid) > UID_MAX_LENGTH:
        return f"is {len(uid)} characters long, the maximum is {UID_MAX_LENGTH}"
    # mypyc compiles `ord(uid[index])` to a read of the code point, which
    # costs less than the method call of a regular expression match.
    for index in range(len(uid)):
        code = ord(uid[index])
        if (
            code < _UID_MIN_CODE
            or code > _UID_MAX_CODE
            or code in (_OPEN_BRACE, _CLOSE_BRACE)
        ):
            return (
                "must be printable ASCII without whitespace, '{', '}' or "
                "control characters"
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
