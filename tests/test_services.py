from __future__ import annotations

from typing import Any

import pytest

from proxy.config import parse_config
from proxy.services import Service


def described(**game: Any) -> str:
    config = parse_config({"services": {"game": game}}, environ={})
    return Service(config.services["game"]).describe()


@pytest.mark.parametrize(
    ("pods", "expected"),
    [
        (["10.0.0.1:80"], "game (1 pod, round_robin)"),
        (["10.0.0.1:80", "10.0.0.2:80"], "game (2 pods, round_robin)"),
    ],
)
def test_describe_counts_static_pods(pods: list[str], expected: str) -> None:
    assert described(pods=pods) == expected


@pytest.mark.parametrize(
    ("replicas", "expected"),
    [
        (1, "game (1 pod per namespace in default, round_robin)"),
        (3, "game (3 pods per namespace in default, round_robin)"),
    ],
)
def test_describe_counts_templated_pods(replicas: int, expected: str) -> None:
    template = "game-{index}.{namespace}:80"

    assert described(address_template=template, replicas=replicas) == expected
