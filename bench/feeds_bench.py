"""Benchmark of the feeds matcher: 1,000,000 IPv4 indicators and 1,000,000 domains.

Run: ``.venv/bin/python bench/feeds_bench.py [--n 1000000] [--lookups 1000000] [--parse]``

Prints, each against its target: matcher load time (held indicators -> matcher, as a
FeedManager rebuild does), resident memory added by the loaded matcher and by the compact
per-feed indicator sets a FeedManager keeps (RSS deltas), and lookups per second for IPs and
domains on miss-heavy traffic and on hits, on one CPU core (rates per CPU second, best of
``--repeat`` runs, so other processes on the machine distort them less; wall-clock rates
beside). IP misses are random public addresses. Domain misses are unlisted names in the mix
MISS_MIX describes (printed with the figures): mostly random names under real TLDs, plus the
harder near misses real traffic has, under parents the feed lists other names below. Domains
are looked up through both entry points: ``match_canonical_domain`` (what the gateway calls,
with names it has normalised) and ``match_domain`` (any spelling, normalised per lookup).
``--parse`` also times the ``lines`` parser on a generated body of the same size (not part of
the load target).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import time
from collections.abc import Callable, Iterator

from feeds.indicator import Indicator, IndicatorSet, IndicatorType, Provenance
from feeds.matcher import FeedRules, Matcher
from feeds.parsers import parse_lines

TARGET_LOAD_SECONDS = 10.0
TARGET_MEMORY_MB = 400.0
TARGET_LOOKUPS_PER_SECOND = 1_000_000.0

# Realistic mix: mostly single addresses, then /24s, a few wider networks.
PREFIX_MIX = ((32, 0.80), (24, 0.17), (20, 0.029), (16, 0.001))
TLDS = ("com", "net", "org", "ru", "info", "xyz", "top", "co.uk", "de", "cn")
# Shared hosting and cloud parents (public suffixes): feeds list many names below them.
HOSTING = (
    "duckdns.org",
    "blogspot.com",
    "s3.amazonaws.com",
    "web.app",
    "github.io",
    "azurewebsites.net",
    "pages.dev",
    "herokuapp.com",
    "workers.dev",
    "netlify.app",
)
# Lookup traffic: TLDs weighted roughly by their share of real traffic, sub-domain prefixes.
QUERY_TLDS = (
    ("com", 46), ("net", 8), ("org", 7), ("io", 5), ("de", 4), ("ru", 3), ("cn", 3),
    ("fr", 2), ("nl", 2), ("info", 2), ("xyz", 2), ("top", 2), ("app", 2), ("dev", 2),
    ("ai", 2), ("eu", 2), ("jp", 1), ("br", 1), ("in", 1), ("us", 1), ("me", 1), ("tv", 1),
    ("cloud", 1), ("co", 1),
)  # fmt: skip
MULTI_LABEL_SUFFIXES = ("co.uk", "com.au", "com.br", "co.jp", "com.tr", "co.in")
SUB_PREFIXES = (
    ("", 35), ("www.", 25), ("api.", 8), ("cdn.", 6), ("static.", 5), ("mail.", 5),
    ("login.", 4), ("auth.eu-west-1.", 4), ("img1.", 4), ("a.b.", 4),
)  # fmt: skip
MISS_MIX = (
    # (share, kind, what): the miss traffic, printed with the figures.
    (0.70, "random", "random names under real TLDs (com 46 %, net, org, io, ...), 0-2 sub-labels"),
    (0.10, "multi", "names under multi-label public suffixes (co.uk, com.au, com.br, ...)"),
    (0.15, "hosting", "other names under shared-hosting parents with listed names (github.io...)"),
    (0.05, "sibling", "other hosts of listed domains (www.X.com when cdn3.X.com is listed)"),
)


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
    """Distinct registrable-looking names: a quarter with a sub-domain, 5 % on shared hosting."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = f"{rng.getrandbits(40):x}{i}"
        if i % 20 == 1:
            name = f"{label}.{HOSTING[i // 20 % len(HOSTING)]}"
        else:
            name = f"{label}.{TLDS[i % len(TLDS)]}"
            if i % 4 == 0:
                name = f"cdn{i % 7}.{name}"
        out.append(name)
    return out


_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_LABEL_CHARS = _LETTERS + "0123456789-"


def _word(rng: random.Random) -> str:
    """A random label of 3-15 characters ending in z: never a listed label (those are hex)."""
    size = rng.randint(3, 15)
    return rng.choice(_LETTERS) + "".join(rng.choices(_LABEL_CHARS, k=size - 2)) + "z"


def gen_miss_names(n: int, listed: list[str], rng: random.Random) -> list[str]:
    """Unlisted names in the proportions of MISS_MIX, in random order."""
    tlds, tld_weights = zip(*QUERY_TLDS, strict=True)
    subs, sub_weights = zip(*SUB_PREFIXES, strict=True)
    with_sub = [name for name in listed if name.startswith("cdn")]
    kinds: list[str] = []
    for k, (share, kind, _) in enumerate(MISS_MIX):
        kinds += [kind] * (n - len(kinds) if k == len(MISS_MIX) - 1 else round(n * share))
    # Shuffle the kinds, then make each name in lookup order: the gateway looks up a name it
    # has just parsed (in the CPU cache); names shuffled after the fact lie scattered over the
    # heap and add a cache miss per lookup that the gateway does not pay.
    rng.shuffle(kinds)
    out: list[str] = []
    for kind in kinds:
        sub = rng.choices(subs, sub_weights)[0]
        if kind == "random":
            out.append(f"{sub}{_word(rng)}.{rng.choices(tlds, tld_weights)[0]}")
        elif kind == "multi":
            out.append(f"{sub}{_word(rng)}.{rng.choice(MULTI_LABEL_SUFFIXES)}")
        elif kind == "hosting":
            out.append(f"{sub}{_word(rng)}.{rng.choice(HOSTING)}")
        else:
            host = rng.choice(with_sub)
            out.append(f"www.{host[host.index('.') + 1 :]}")
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


def _rate(fn: Callable[[str], object], queries: list[str], repeat: int) -> tuple[float, float, int]:
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
            if match(q):
                hits += 1
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    return len(queries) / best_cpu, len(queries) / best_wall, hits


def _line(label: str, value: float, unit: str, target: float, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value <= target
    cmp = ">=" if higher_is_better else "<="
    verdict = "OK" if ok else "MISS"
    return f"{label:<36} {value:>14,.1f} {unit:<10} target {cmp} {target:,.0f}  {verdict}"


def _lookups(repeat: int, *runs: tuple[str, Callable[[str], object], list[str]]) -> None:
    """Print the rate of each (label, lookup, queries); misses are held to the target."""
    for label, fn, queries in runs:
        rate, wall_rate, hits = _rate(fn, queries, repeat)
        target = TARGET_LOOKUPS_PER_SECOND if "miss" in label else 0.0
        print(
            _line(label, rate, "lookups/s", target, True)
            + f"  ({hits:,} hits; {wall_rate:,.0f}/s wall clock)"
        )


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
    miss_names = gen_miss_names(args.lookups, names, rng)
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
    print("IP miss traffic: random public addresses (6 % of them in a listed network)")
    _lookups(
        args.repeat,
        ("IP lookups, random (miss-heavy)", matcher.match_ip, miss_ips),
        ("IP lookups, unlisted only (miss)", matcher.match_ip, unlisted_ips),
        ("IP lookups, listed (hits)", matcher.match_ip, hit_ips),
    )
    print("domain miss traffic (all unlisted, canonical spelling):")
    for share, _, what in MISS_MIX:
        print(f"  {share:4.0%} {what}")
    # Two entry points: match_domain normalises what it is given (any spelling);
    # match_canonical_domain takes names already canonical, as the gateway passes them.
    _lookups(
        args.repeat,
        ("domain lookups, canonical (miss)", matcher.match_canonical_domain, miss_names),
        ("domain lookups, any spelling (miss)", matcher.match_domain, miss_names),
        ("domain lookups, canonical (hits)", matcher.match_canonical_domain, hit_names),
        ("domain lookups, any spelling (hits)", matcher.match_domain, hit_names),
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
                f"{label:<36} {cpu:>14,.1f} s CPU      ({wall:.1f} s wall; "
                f"{len(result.indicators):,} indicators; not part of the load target)"
            )
            del result


def _ip_body(nets: list[tuple[int, int]]) -> bytes:
    return "\n".join(_ip_text(a) if p == 32 else f"{_ip_text(a)}/{p}" for a, p in nets).encode()


if __name__ == "__main__":
    main()
