"""Read the CUDA LED slice launches' per-item clocks: which items, on which SMs, set a launch's time.

    L2D_CUDA_LED_ITEM_CLOCKS=clocks.txt python benchmarks/ncu_driver.py led 64 80 768 cuda
    python benchmarks/item_clocks.py clocks.txt

The CUDA extension, with ``L2D_CUDA_LED_ITEM_CLOCKS`` set, appends one line per work item of each
width-split slice launch (it synchronizes: profiling only): the launch (0: both families' partial
Grams; 1: CD's weights and gradient; 2: ID's), the item, its SM, its start (the device's
nanosecond clock), the SM cycles it took and its group's size (negative: passed over, the group
has no place in the scratch). A launch runs one block per SM; items come largest tile first, each
block taking the next from the launch's queue (or, with ``L2D_CUDA_LED_QUEUE=0``, items b,
b + blocks, ... in turn), so a launch lasts as long as its busiest SM's items. For the last call of
each shape in the file, per launch: how far apart the items' starts are, the busiest SM's items and
cycles against the mean SM's, with ``--ghz`` the span from the first start to the last end and how
busy the SMs were within it and the time between a block's consecutive items (one block per SM:
from an item's end to the next one's start, the block takes its next item over), and the cycles of
items by tile size (16, 32, 64 rows) and of those passed over.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys


def parse(lines) -> list[dict]:
    """Calls in order: {"shape": (B, C, D, n_s), "items": [(launch, item, sm, start_ns, cycles, P), ...]}."""
    calls = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            calls.append({"shape": tuple(int(x) for x in line[1:].split()), "items": []})
        elif calls:
            calls[-1]["items"].append(tuple(int(x) for x in line.split()))
    return calls


def _tile(p: int) -> str:
    if p < 0:
        return "passed over"
    return "16 rows" if p <= 16 else "32 rows" if p <= 32 else "64 rows"


def summarize(call: dict, ns_per_cycle: float | None = None) -> list[str]:
    """Text lines for one call (see the module docstring)."""
    B, C, D, n_s = call["shape"]
    out = [f"{B} x {C} x {D}, {n_s} slices a group"]
    for launch, name in enumerate(("Grams (both families)", "CD weights and gradient", "ID weights and gradient")):
        items = [r for r in call["items"] if r[0] == launch]
        if not items:
            continue
        span = max(r[3] for r in items) - min(r[3] for r in items)  # starts only: ends need a clock rate
        per_sm = collections.defaultdict(list)
        for r in items:
            per_sm[r[2]].append(r)
        busiest = max(per_sm.values(), key=lambda rs: sum(r[4] for r in rs))
        mean_sm = statistics.fmean(sum(r[4] for r in rs) for rs in per_sm.values())
        out.append(f"  launch {launch}, {name}: {len(items)} items on {len(per_sm)} SMs; starts spread over "
                   f"{span / 1000:.1f} us; busiest SM {len(busiest)} items, {sum(r[4] for r in busiest)} cycles "
                   f"(mean SM {mean_sm:.0f})")
        if ns_per_cycle:  # ends need the clock rate: the span and how busy the SMs were within it
            end = max(r[3] + r[4] * ns_per_cycle for r in items)
            whole = end - min(r[3] for r in items)
            busy = statistics.fmean(sum(r[4] for r in rs) for rs in per_sm.values()) * ns_per_cycle
            last_ends = sorted(max(r[3] + r[4] * ns_per_cycle for r in rs) for rs in per_sm.values())
            out.append(f"    first start to last end {whole / 1000:.1f} us; SMs busy {100 * busy / whole:.0f}% of it "
                       f"on average; the median SM's last item ends {(end - statistics.median(last_ends)) / 1000:.1f}"
                       f" us before the last")
            # One block per SM: an SM's items in start order are one block's; between an item's end and
            # the next one's start, the block takes over its next item (the entry's hand-over, a barrier).
            gaps = []
            for rs in per_sm.values():
                in_order = sorted(rs, key=lambda r: r[3])
                gaps += [b[3] - (a[3] + a[4] * ns_per_cycle) for a, b in zip(in_order, in_order[1:])]
            gaps.sort()
            if gaps:
                out.append(f"    between a block's items: median {statistics.median(gaps):.0f} ns, "
                           f"max {gaps[-1]:.0f} ns ({len(gaps)} hand-overs)")
        slowest = max(items, key=lambda r: r[4])
        out.append(f"    slowest item {slowest[1]} (group of {abs(slowest[5])}): {slowest[4]} cycles"
                   + (f", {slowest[4] * ns_per_cycle / 1000:.1f} us" if ns_per_cycle else ""))
        by_tile = collections.defaultdict(list)
        for r in items:
            by_tile[_tile(r[5])].append(r[4])
        for tile in ("16 rows", "32 rows", "64 rows", "passed over"):
            if tile in by_tile:
                c = sorted(by_tile[tile])
                out.append(f"    {tile}: {len(c)} items, cycles median {statistics.median(c):.0f}, max {c[-1]}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--ghz", type=float, default=None, help="SM clock, to print times as well as cycles")
    args = parser.parse_args(argv)
    with open(args.path) as fh:
        calls = parse(fh)
    if not calls:
        print(f"no calls in {args.path}")
        return 1
    last = {c["shape"]: c for c in calls}  # the last call of each shape, in the order first seen
    print("\n".join(line for call in last.values() for line in summarize(call, 1.0 / args.ghz if args.ghz else None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
