"""Selection benchmark: the cost of one pick of each strategy, by pool size.

Builds a pod set of 4, 64 and 1,024 READY pods with random loads, a stats
table where every pod has one latency sample and 0 to 3 requests in flight,
and times `pick` with timeit over 1,000 different UIDs. It prints one row per
strategy, in microseconds per pick (the best of the repeats), and a last row
with the cost that the forwarding handler adds per request (`start` and
`finish` on the stats table). No network, no processes. It needs the
package installed (``pip install -e .``).

    python benchmarks/selection.py --repeat 5

The file is not named ``select.py``: run as a script, its folder comes first
on ``sys.path``, where that name would shadow the standard ``select`` module.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import timeit
from collections.abc import Callable

from proxy.balancing import build_strategy
from proxy.config import STRATEGIES, ServiceSettings
from proxy.pods import Address, Pod
from proxy.podset import PodSet, build_pod_set
from proxy.podstate import PodState, Routing, now_ms
from proxy.stats import PodStats

POOL_SIZES = (4, 64, 1024)
UID_COUNT = 1000


def pod_address(index: int) -> Address:
    return Address(f"10.0.{index // 250}.{index % 250}", 8000)


def build_case(
    strategy: str, size: int, rng: random.Random
) -> tuple[Callable[[], object], PodStats]:
    """Return a function doing one pick, cycling over the UIDs, and its stats."""
    pods = tuple(Pod(index, pod_address(index)) for index in range(size))
    addresses = tuple(str(pod.address) for pod in pods)
    weights = tuple(rng.randint(1, 5) for _ in range(size))
    settings = ServiceSettings(
        name="game",
        pods=addresses,
        strategy=strategy,
        weights=weights if strategy == "weighted_round_robin" else (),
    )
    at_ms = now_ms()
    records = {
        pod.index: PodState(rng.randint(0, 1000), Routing.READY, at_ms) for pod in pods
    }
    pod_set: PodSet = build_pod_set(settings, "default", pods, records, at_ms)

    stats = PodStats(settings.ewma_decay_s)
    for pod in pods:
        stats.finish(stats.start(pod), rng.uniform(0.001, 0.050), 200)
        for _ in range(rng.randint(0, 3)):
            stats.start(pod)

    selector = build_strategy(settings, stats)
    routable = pod_set.routable
    uids = itertools.cycle([f"user-{number}" for number in range(UID_COUNT)])

    def pick() -> object:
        return selector.pick(routable, next(uids), pod_set)

    return pick, stats


def time_call(call: Callable[[], object], repeat: int) -> float:
    """Return the best time of one call in microseconds."""
    timer = timeit.Timer(call)
    number, _ = timer.autorange()
    best = min(timer.repeat(repeat=repeat, number=number))
    return best / number * 1e6


def time_recording(size: int, rng: random.Random, repeat: int) -> float:
    """Return the cost of recording one request: `start`, then `finish`."""
    _, stats = build_case("round_robin", size, rng)
    pod = Pod(size // 2, pod_address(size // 2))

    def record() -> None:
        stats.finish(stats.start(pod), 0.004, 200)

    return time_call(record, repeat)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timeit repeats")
    parser.add_argument("--seed", type=int, default=1, help="seed of loads and UIDs")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    header = ["strategy", *(f"{size} pods" for size in POOL_SIZES)]
    rows = []
    for strategy in STRATEGIES:
        cells = [
            time_call(build_case(strategy, size, rng)[0], args.repeat)
            for size in POOL_SIZES
        ]
        rows.append([strategy, *(f"{cell:.2f}" for cell in cells)])
    recording = [time_recording(size, rng, args.repeat) for size in POOL_SIZES]
    rows.append(["(record one request)", *(f"{cell:.2f}" for cell in recording)])

    print(f"microseconds per call, best of {args.repeat} repeats")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
