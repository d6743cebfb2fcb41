from __future__ import annotations

import pytest

from proxy.names import dns_label_problem, uid_problem


@pytest.mark.parametrize(
    "uid", ["alice", "0", "user:42", "a" * 128, "!#$%&'()*+,-./:;<=>?@[\\]^_`|~"]
)
def test_uid_accepts_printable_ascii(uid: str) -> None:
    assert uid_problem(uid) is None


@pytest.mark.parametrize(
    ("uid", "expected"),
    [
        ("", "is empty"),
        ("a" * 129, "129 characters"),
        ("a{b", "'{'"),
        ("a}b", "'}'"),
        ("a b", "whitespace"),
        ("a\tb", "whitespace"),
        ("a\x00b", "control"),
        ("a\x7fb", "control"),
        ("caf\u00e9", "ASCII"),
    ],
)
def test_uid_rejects_invalid_value(uid: str, expected: str) -> None:
    problem = uid_problem(uid)
    assert problem is not None
    assert expected in problem


def test_uid_characters_by_code_point() -> None:
    for code in range(0x300):
        character = chr(code)
        valid = 0x21 <= code <= 0x7E and character not in "{}"
        assert (uid_problem(f"a{character}b") is None) == valid, hex(code)
        assert (uid_problem(character) is None) == valid, hex(code)


@pytest.mark.parametrize("name", ["default", "eu-west-1", "a", "0", "x" * 63])
def test_dns_label_accepts_valid_label(name: str) -> None:
    assert dns_label_problem(name) is None


@pytest.mark.parametrize(
    "name", ["", "-a", "a-", "Game", "a.b", "a_b", "x" * 64, "a{b}", "sp ace"]
)
def test_dns_label_rejects_invalid_label(name: str) -> None:
    assert dns_label_problem(name) is not None
