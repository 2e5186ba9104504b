"""Benchmark of the feeds matcher: 1,000,000 IPv4 indicators and 1,000,000 domains.

Run: ``.venv/bin/python bench/feeds_bench.py [--n 1000000] [--lookups 1000000] [--parse]``

Prints, each against its target: matcher load time (held indicators -> matcher, as a
FeedManager rebuild does), resident memory added by the loaded matcher and by the compact
per-feed indicator sets a FeedManager keeps (RSS deltas), and lookups per second for IPs and
domains on miss-heavy traffic (random values) and on hits, on one CPU core (rates per CPU
second, best of ``--repeat`` runs, so other processes on the machine distort them less;
wall-clock rates beside).
``--parse`` also times the ``lines`` parser on a generated body of the same size (not part of
the load target).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import time
from collections.abc import Iterator

from feeds.indicator import Indicator, IndicatorSet, IndicatorType, Provenance
from feeds.matcher import FeedRules, Matcher
from feeds.parsers import parse_lines

TARGET_LOAD_SECONDS = 10.0
TARGET_MEMORY_MB = 400.0
TARGET_LOOKUPS_PER_SECOND = 1_000_000.0

# Realistic mix: mostly single addresses, then /24s, a few wider networks.
PREFIX_MIX = ((32, 0.80), (24, 0.17), (20, 0.029), (16, 0.001))
TLDS = ("com", "net", "org", "ru", "info", "xyz", "top", "co.uk", "de", "cn")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _public_ipv4(rng: random.Random) -> int:
    while True:
        n = rng.getrandbits(32)
        first = n >> 24
        if first not in (0, 10, 127) and first < 224 and (n >> 16) != 0xC0A8:
            return n


def gen_networks(n: int, seed: int = 1) -> list[tuple[int, int]]:
    """(address int, prefix length) pairs following PREFIX_MIX."""
    rng = random.Random(seed)
    out = []
    for plen, share in PREFIX_MIX:
        for _ in range(int(n * share)):
            addr = _public_ipv4(rng)
            out.append(((addr >> (32 - plen)) << (32 - plen), plen))
    while len(out) < n:
        out.append((_public_ipv4(rng), 32))
    return out


def _ip_text(n: int) -> str:
    return f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def gen_domains(n: int, seed: int = 2) -> list[str]:
    """Distinct registrable-looking names, some with a sub-domain."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = f"{rng.getrandbits(40):x}{i}"
        name = f"{label}.{TLDS[i % len(TLDS)]}"
        if i % 4 == 0:
            name = f"cdn{i % 7}.{name}"
        out.append(name)
    return out


def ip_indicators(nets: list[tuple[int, int]], prov: Provenance) -> Iterator[Indicator]:
    """Indicators for the generated networks (built lazily, as a parser would hand them over)."""
    for addr, plen in nets:
        if plen == 32:
            yield Indicator(IndicatorType.IP, _ip_text(addr), prov)
        else:
            yield Indicator(IndicatorType.CIDR, f"{_ip_text(addr)}/{plen}", prov)


def domain_indicators(names: list[str], prov: Provenance) -> Iterator[Indicator]:
    """Domain indicators for the generated names."""
    for name in names:
        yield Indicator(IndicatorType.DOMAIN, name, prov)


def _rate(fn: object, queries: list[str], repeat: int) -> tuple[float, float, int]:
    """Best of ``repeat`` runs: (lookups per CPU second, per wall second, hits).

    CPU time leaves out the time other processes took the core; the best run (as timeit
    reports) leaves out a run disturbed by them.
    """
    match = fn
    best_cpu = best_wall = float("inf")
    hits = 0
    for _ in range(repeat):
        hits = 0
        wall = time.perf_counter()
        cpu = time.process_time()
        for q in queries:
            if match(q):  # type: ignore[operator]
                hits += 1
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    return len(queries) / best_cpu, len(queries) / best_wall, hits


def _line(label: str, value: float, unit: str, target: float, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value <= target
    cmp = ">=" if higher_is_better else "<="
    verdict = "OK" if ok else "MISS"
    return f"{label:<34} {value:>14,.1f} {unit:<10} target {cmp} {target:,.0f}  {verdict}"


def main() -> None:
    """Run the benchmark and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="indicators of each kind")
    ap.add_argument("--lookups", type=int, default=1_000_000, help="lookups per measurement")
    ap.add_argument("--repeat", type=int, default=3, help="runs per lookup figure (best kept)")
    ap.add_argument("--parse", action="store_true", help="also time the lines parser")
    ap.add_argument("--cpu", type=int, default=None, help="pin to this CPU (default: first)")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    cpu = args.cpu if args.cpu is not None else cpus[0]
    os.sched_setaffinity(0, {cpu})
    print(f"feeds matcher benchmark: {args.n:,} IPv4 + {args.n:,} domains, one core (cpu {cpu})")

    nets = gen_networks(args.n)
    names = gen_domains(args.n)
    rng = random.Random(3)
    miss_ips = [_ip_text(_public_ipv4(rng)) for _ in range(args.lookups)]
    hit_ips = [_ip_text(a | rng.getrandbits(32 - p)) for a, p in rng.choices(nets, k=args.lookups)]
    miss_names = [
        f"www{i % 10}.{rng.getrandbits(48):x}.{TLDS[i % len(TLDS)]}" for i in range(args.lookups)
    ]
    hit_names = [f"a.{n}" if i % 2 else n for i, n in enumerate(rng.choices(names, k=args.lookups))]
    ip_prov = Provenance("bench-ips", confidence=80)
    dom_prov = Provenance("bench-domains", confidence=80)
    gc.collect()

    # What a FeedManager holds: each feed's indicators, compactly (for rebuilds and diffs).
    before = rss_bytes()
    ip_set = IndicatorSet(ip_indicators(nets, ip_prov), ip_prov)
    dom_set = IndicatorSet(domain_indicators(names, dom_prov), dom_prov)
    gc.collect()
    held_mb = (rss_bytes() - before) / 1e6

    before = rss_bytes()
    start = time.perf_counter()
    start_cpu = time.process_time()
    matcher = Matcher.build_raw(
        [
            (FeedRules("bench-ips"), ip_set.triples()),
            (FeedRules("bench-domains"), dom_set.triples()),
        ]
    )
    load = time.perf_counter() - start
    load_cpu = time.process_time() - start_cpu
    gc.collect()
    rss_delta_mb = (rss_bytes() - before) / 1e6
    print(f"entries: {dict(matcher.counts)}")
    print(
        _line("load (build matcher)", load, "s", TARGET_LOAD_SECONDS, False)
        + f"  ({load_cpu:.1f} s CPU)"
    )
    print(_line("memory of the matcher (RSS delta)", rss_delta_mb, "MB", TARGET_MEMORY_MB, False))
    print(
        _line("memory incl. held indicators", rss_delta_mb + held_mb, "MB", TARGET_MEMORY_MB, False)
    )

    unlisted_ips = [q for q in miss_ips if not matcher.match_ip(q)]
    for label, fn, queries in (
        ("IP lookups, random (miss-heavy)", matcher.match_ip, miss_ips),
        ("IP lookups, unlisted only (miss)", matcher.match_ip, unlisted_ips),
        ("IP lookups, listed (hits)", matcher.match_ip, hit_ips),
        ("domain lookups, random (miss)", matcher.match_domain, miss_names),
        ("domain lookups, listed (hits)", matcher.match_domain, hit_names),
    ):
        rate, wall_rate, hits = _rate(fn, queries, args.repeat)
        target = TARGET_LOOKUPS_PER_SECOND if "miss" in label else 0.0
        print(
            _line(label, rate, "lookups/s", target, True)
            + f"  ({hits:,} hits; {wall_rate:,.0f}/s wall clock)"
        )

    if args.parse:
        for label, body, prov in (
            ("parse lines (IPs)", _ip_body(nets), ip_prov),
            ("parse lines (domains)", "\n".join(names).encode(), dom_prov),
        ):
            wall = time.perf_counter()
            cpu = time.process_time()
            result = parse_lines(body, provenance=prov)
            cpu = time.process_time() - cpu
            wall = time.perf_counter() - wall
            print(
                f"{label:<34} {cpu:>14,.1f} s CPU      ({wall:.1f} s wall; "
                f"{len(result.indicators):,} indicators; not part of the load target)"
            )
            del result


def _ip_body(nets: list[tuple[int, int]]) -> bytes:
    return "\n".join(_ip_text(a) if p == 32 else f"{_ip_text(a)}/{p}" for a, p in nets).encode()


if __name__ == "__main__":
    main()
