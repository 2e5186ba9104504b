"""The ``egressgw`` command: run, check, explain, feeds, firewall, node."""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import structlog
import uvloop
from pydantic import ValidationError

from egressgw import __version__
from egressgw.app import Gateway, build_runtime, build_services
from egressgw.config import model as cfgmod
from egressgw.config import policyobjects
from egressgw.config.kubernetes import ResourcesUnreadable, read_objects
from egressgw.config.source import ConfigError
from egressgw.decision.names import parse_authority, parse_ip_port
from egressgw.decision.path import Runtime, explain_flow
from egressgw.decision.policy import Policy
from egressgw.flow import Flow
from egressgw.logs import configure_logging
from egressgw.net import nft
from egressgw.node import NodeRules, summarise, to_setup_script, to_teardown_script
from egressgw.threats import MatcherThreats
from egressgw.workers import supervisor
from egressgw.workers import worker as worker_process
from feeds import cli as feeds_cli
from feeds.options import ParseOptions
from feeds.refresh import MissingFeedData
from siem.firewall import to_nft_set

EXIT_DENY = 3
EXIT_NOT_INSTALLED = 3  # `node status`: the rules are not installed

log = structlog.get_logger("egressgw.cli")


def _load(path: Path | None) -> cfgmod.Config:
    return cfgmod.load_config(path) if path is not None else cfgmod.default_config()


async def _serve(cfg: cfgmod.Config, path: Path | None) -> None:
    gateway = Gateway(cfg, path)
    await gateway.start()
    # Everything loaded so far (config, policy, feeds) lives as long as the process: keep it out
    # of the cyclic collector's sweeps, which otherwise rescan it on every full collection.
    gc.freeze()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal() -> None:
        # The first signal starts the shutdown; another one skips what is left of its delay.
        if stop.is_set():
            gateway.hurry()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGHUP, gateway.request_reload, "SIGHUP")
    await stop.wait()
    await gateway.shutdown()


def raise_descriptor_limit() -> tuple[int, int]:
    """Lift the soft limit on open descriptors to the hard one; return (before, after).

    Each client connection holds one descriptor and its destination another, and a lookup up to
    two more: the common soft default (1,024) runs out long before ``proxy.max_connections``,
    and a gateway out of descriptors refuses everyone. The hard limit is the operator's (or the
    container runtime's) choice; the soft one is only a default.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit", soft=soft, hard=hard, error=str(e))
            return soft, soft
        log.info("open-file limit raised", before=soft, after=hard)
        return soft, hard
    return soft, soft


def cmd_run(args: argparse.Namespace) -> int:
    """Run the gateway until SIGTERM."""
    try:
        cfg = _load(args.config)
    except ConfigError as e:
        n = len(e.errors)
        print(
            f"egressgw: configuration refused ({n} error{'s' if n != 1 else ''}):", file=sys.stderr
        )
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    configure_logging(cfg.log.level, cfg.log.format)
    raise_descriptor_limit()  # the workers inherit the raised limit
    workers = cfgmod.worker_count(cfg)
    try:
        if workers > 1 and args.config is not None:
            uvloop.run(supervisor.serve(cfg, args.config, workers))
        else:
            uvloop.run(_serve(cfg, args.config))
    except ConfigError as e:
        for line in e.errors:
            print(f"egressgw: {line}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"egressgw: cannot start: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_check(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Validate configuration and policy; print every error; exit 1 on any."""
    out = out or sys.stdout
    errors: list[str] = []
    cfg = None
    if args.config is None:
        cfg = cfgmod.default_config()
    else:
        try:
            cfg, errors = cfgmod.read_config(args.config)
        except ConfigError as e:
            errors = list(e.errors)
        if cfg is not None:
            errors.extend(cfgmod.feed_file_errors(args.config, cfg))
    if cfg is not None:
        warnings = cfgmod.unbuilt(cfg)
        resources = ""
        try:
            rt = build_runtime(cfg, build_services(cfg))
        except ConfigError as e:
            errors.extend(e.errors)
        else:
            judged, unread = uvloop.run(_resources(cfg, rt.policy))
            if unread is not None:
                warnings.append(unread)
            if judged is not None:
                refused = [(k, v) for k, v in judged.verdicts.items() if not v.accepted]
                errors.extend(f"{policyobjects.describe(k)}: {v.message}" for k, v in refused)
                resources = f", {len(judged.verdicts)} resources"
                rt = Runtime.over(rt.services, judged.policy, rt.guard)
        if not errors:
            rules = sum(len(t.rules) for t in rt.policy.tiers)
            print(
                f"ok: {args.config or '(embedded defaults)'}: {len(rt.policy.tiers)} tiers, "
                f"{rules} rules, default {rt.policy.default}, {len(cfg.feeds)} feeds, "
                f"{len(cfg.sinks)} sinks{resources}",
                file=out,
            )
            for warning in warnings:
                print(f"warning: {warning}", file=out)
            return 0
    for line in errors:
        print(line, file=out)
    print(f"{len(errors)} error{'s' if len(errors) != 1 else ''}", file=out)
    return 1


def _feed_lines(data: Sequence[feeds_cli.FeedData]) -> list[str]:
    if not data:
        return ["feed data:   no feeds configured"]
    return [f"{'feed data:' if i == 0 else '':<13}{d.describe()}" for i, d in enumerate(data)]


def _no_data_message(data: Sequence[feeds_cli.FeedData], what: str) -> str | None:
    """Why a tool must not answer, when a feed it judges with has no data; else None."""
    missing = [d.feed for d in data if not d.has_data]
    if not missing:
        return None
    return (
        f"egressgw: cannot {what}: no data for feed(s) {', '.join(missing)} (its matches would "
        "be missing from the answer); fix the source and run `egressgw feeds update`"
    )


async def _resources(
    cfg: cfgmod.Config, files: Policy
) -> tuple[policyobjects.Judged | None, str | None]:
    """The policy resources judged against the files' policy (``policy.kubernetes``), or why
    they could not be read (a warning: the files alone are still checked)."""
    kube = cfg.identity.kubernetes
    if not cfg.policy.kubernetes or kube is None:
        return None, None
    try:
        objects = await read_objects(kube.kubeconfig)
    except ResourcesUnreadable as e:
        return None, f"policy.kubernetes: resources not read from the API: {e}"
    return policyobjects.judge(objects, files, {f.name for f in cfg.feeds}), None


async def _explain(
    cfg: cfgmod.Config, base: Path, source: str, target: str, protocol: str, fetch: bool
) -> tuple[int, list[str]]:
    src = ipaddress.ip_address(source)
    host, port = parse_authority(target)
    judged, unread = await _resources(
        cfg, cfgmod.load_policy(cfg.policy.files, {f.name for f in cfg.feeds})
    )
    specs = [*cfg.feeds, *(judged.feeds if judged is not None else ())]
    # The feed data the running gateway serves: stored, refreshed where it would have been.
    manager, data = await feeds_cli.current_data(specs, base, cfg.state_dir / "feeds", fetch=fetch)
    lines = _feed_lines(data)
    if unread is not None:
        lines.append(f"warning:     {unread}")
    if judged is not None:
        refused = [policyobjects.describe(k) for k, v in judged.verdicts.items() if not v.accepted]
        lines.append(
            f"resources:   {len(judged.verdicts)} from the API"
            + (f", refused: {', '.join(refused)}" if refused else "")
        )
    refusal = _no_data_message(data, "explain")
    if refusal is not None:
        return feeds_cli.EXIT_NO_DATA, [*lines, refusal]
    rt = build_runtime(cfg, build_services(cfg, MatcherThreats(lambda: manager.matcher)))
    if judged is not None:
        rt = Runtime.over(rt.services, judged.policy, rt.guard)
    flow = Flow(src, 0, 0.0, 0.0)
    flow.host, flow.port, flow.protocol = host, port, protocol  # type: ignore[assignment]
    verdict, steps = await explain_flow(rt, flow)
    lines += steps
    return (0 if verdict.allowed else EXIT_DENY), lines


def cmd_explain(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Print how policy decides one flow, step by step, and which feed data it used."""
    out = out or sys.stdout
    try:
        cfg, base = _feeds_context(args)
        code, lines = uvloop.run(
            _explain(cfg, base, args.source, args.to, args.protocol, not args.offline)
        )
    except ConfigError as e:
        for line in e.errors:
            print(line, file=out)
        return 1
    except ValueError as e:
        print(f"egressgw: {e}", file=out)
        return 2
    print("\n".join(lines), file=out)
    return code


def _feeds_context(args: argparse.Namespace) -> tuple[cfgmod.Config, Path]:
    cfg = _load(args.config)
    return cfg, args.config.parent if args.config else Path.cwd()


def cmd_feeds_update(args: argparse.Namespace) -> int:
    """Fetch feeds now and print one row per feed."""
    cfg, base = _feeds_context(args)
    if not cfg.feeds:
        print("no feeds configured", file=sys.stderr)
        return 1
    return feeds_cli.update(cfg.feeds, base, cfg.state_dir / "feeds", args.names, sys.stdout)


def cmd_feeds_check(args: argparse.Namespace) -> int:
    """Parse a local feed file and report what was found, what was rejected, and the verdict."""
    try:
        options = ParseOptions.model_validate(dict(args.option or []))
    except ValidationError as e:
        known = ", ".join(ParseOptions.model_fields)
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown option; known: {known}"
            print(f"egressgw: --option {key}: {msg}", file=sys.stderr)
        return feeds_cli.EXIT_USAGE
    return feeds_cli.check_file(
        args.file, args.format, options, sys.stdout, allow_empty=args.allow_empty
    )


def _warn_stale(data: Sequence[feeds_cli.FeedData]) -> None:
    for d in data:
        if d.stale or d.error:
            print(f"egressgw: warning: feed {d.describe()}", file=sys.stderr)


def cmd_feeds_lookup(args: argparse.Namespace) -> int:
    """Say which configured feeds list a value, from the data the gateway would serve."""
    cfg, base = _feeds_context(args)
    if not cfg.feeds:
        hint = "" if args.config is not None else " (no --config given)"
        print(f"egressgw: no feeds configured{hint}: nothing to look up in", file=sys.stderr)
        return feeds_cli.EXIT_USAGE
    manager, data = uvloop.run(
        feeds_cli.current_data(cfg.feeds, base, cfg.state_dir / "feeds", fetch=not args.offline)
    )
    refusal = _no_data_message(data, f"look up {args.value}")
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return feeds_cli.EXIT_NO_DATA
    _warn_stale(data)
    return feeds_cli.lookup(args.value, manager.matcher, sys.stdout)


def cmd_firewall_nft(args: argparse.Namespace) -> int:
    """Render (or load) an nftables set of the IPs and CIDRs the blocklists serve."""
    cfg, base = _feeds_context(args)
    try:
        to_nft_set(args.table, args.set, [])  # bad names are refused before any fetch
    except ValueError as e:
        print(f"egressgw: {e}", file=sys.stderr)
        return 2
    manager, data = uvloop.run(
        feeds_cli.current_data(cfg.feeds, base, cfg.state_dir / "feeds", fetch=not args.offline)
    )
    try:
        values = manager.blocklist_values("ip", args.feed or None)
    except MissingFeedData as e:
        for d in data:
            if d.feed in e.feeds:
                print(f"egressgw: feed {d.describe()}", file=sys.stderr)
        print(
            f"egressgw: refusing to render the set: {e}; the firewall would lose their "
            "addresses (fix the source and run `egressgw feeds update`, or leave them out "
            "with --feed)",
            file=sys.stderr,
        )
        return feeds_cli.EXIT_NO_DATA
    except ValueError as e:
        print(f"egressgw: {e}", file=sys.stderr)
        return 2
    _warn_stale(data)
    target = f"{args.table} {args.set}_v4/_v6"
    if not values and not args.allow_empty:
        if args.config is None:
            why = "no --config given, so no feeds"
        elif not any(f.kind == "blocklist" and f.enabled for f in cfg.feeds):
            why = "no enabled blocklist feed is configured"
        else:
            why = "the blocklists hold no IP addresses or networks"
        print(
            f"egressgw: refusing an empty set: {why}; loading it would remove every address "
            f"from {target} (--allow-empty to do it anyway)",
            file=sys.stderr,
        )
        return 1
    script = to_nft_set(args.table, args.set, values)
    if not args.apply:
        sys.stdout.write(script)
        return 0
    nft = shutil.which("nft")
    if nft is None:
        print("egressgw: nft not found (install nftables)", file=sys.stderr)
        return 1
    done = subprocess.run([nft, "-f", "-"], input=script, text=True, capture_output=True)
    if done.returncode != 0:
        print(f"egressgw: nft refused the set: {done.stderr.strip()}", file=sys.stderr)
        return 1
    print(f"loaded {len(values)} addresses and networks into {target}")
    return 0


def node_rules(cfg: cfgmod.Config) -> NodeRules:
    """The node's rules as a configuration sets them (ValueError when it names no pods)."""
    node = cfg.node

    def port(listen: str | None) -> int | None:
        return parse_ip_port(listen)[1] if listen is not None else None

    return NodeRules(
        node.table,
        node.pod_cidrs,
        node.interfaces,
        node.exempt_mark,
        dns_port=port(cfg.dns.listen),
        tcp_port=port(cfg.transparent.listen),
        exclude_cidrs=node.exclude_cidrs,
    )


def cmd_node(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Install, remove or show the node's nftables rules."""
    out = out or sys.stdout
    try:
        cfg = _load(args.config)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 1
    table = cfg.node.table
    try:
        if args.node_command == "setup":
            rules = node_rules(cfg)
            script = to_setup_script(rules)
            if args.dry_run:
                out.write(script)
                return 0
            nft.apply(script)
            print(f"installed: table inet {table}", file=out)
            for warning in cfgmod.unbuilt(cfg):
                print(f"warning: {warning}", file=sys.stderr)
            return 0
        if args.node_command == "teardown":
            nft.apply(to_teardown_script(table))
            print(f"removed: table inet {table}", file=out)
            return 0
        listing = nft.list_table(table)
    except (ValueError, nft.NftError) as e:
        print(f"egressgw: node {args.node_command}: {e}", file=sys.stderr)
        return 1
    if listing is None:
        print(f"not installed: no table inet {table}", file=out)
        return EXIT_NOT_INSTALLED
    print(f"installed: table inet {table}", file=out)
    for line in summarise(listing):
        print(f"  {line}", file=out)
    if args.verbose:
        out.write(listing)
    return 0


def _option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


DESCRIPTION = (
    "egressgw, an egress gateway: run it, check its configuration, explain a decision, "
    "work with threat feeds and export blocklists to firewalls."
)
OFFLINE_HELP = (
    "use only the feed data stored by the gateway or `feeds update`; refuse when a feed has "
    "none (default: fetch feeds whose data is missing or older than their period, re-read "
    "local files)"
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the egressgw command."""
    parser = argparse.ArgumentParser(prog="egressgw", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"egressgw {__version__}")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        # `worker` is left out: the supervisor runs it (proxy.workers), nobody else.
        metavar="{run,check,explain,feeds,firewall,node}",
    )
    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("--config", type=Path, help="configuration file (embedded defaults if none)")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="validate configuration and policy")
    check.add_argument("--config", type=Path, help="configuration file")
    check.set_defaults(func=cmd_check)
    explain = sub.add_parser("explain", help="show how policy decides a flow")
    explain.add_argument("--config", type=Path, help="configuration file")
    explain.add_argument("--from", dest="source", required=True, help="source IP address")
    explain.add_argument("--to", required=True, help="destination HOST:PORT")
    explain.add_argument(
        "--protocol",
        choices=["tls", "tcp", "http"],
        default="tls",
        help="what the flow carries, as policy protocols select it (default tls)",
    )
    explain.add_argument("--offline", action="store_true", help=OFFLINE_HELP)
    explain.set_defaults(func=cmd_explain)
    feeds = sub.add_parser("feeds", help="threat feeds: update, check a file, look up a value")
    feeds_sub = feeds.add_subparsers(dest="feeds_command", required=True)
    update = feeds_sub.add_parser("update", help="fetch feeds now (all, or the named ones)")
    update.add_argument("--config", type=Path, help="configuration file")
    update.add_argument("names", nargs="*", help="feed names (default: every enabled feed)")
    update.set_defaults(func=cmd_feeds_update)
    fcheck = feeds_sub.add_parser("check", help="parse a local feed file and report")
    fcheck.add_argument("file", type=Path, help="feed file to parse (gzip is decompressed)")
    fcheck.add_argument("--format", required=True, help="lines, hosts, csv, json, spamhaus, stix")
    fcheck.add_argument(
        "--option", action="append", type=_option, help="format option KEY=VALUE (repeatable)"
    )
    fcheck.add_argument(
        "--allow-empty",
        action="store_true",
        help="judge it as a feed with allow_empty: true (an empty list is accepted)",
    )
    fcheck.set_defaults(func=cmd_feeds_check)
    lookup = feeds_sub.add_parser("lookup", help="which feeds list a domain, IP or URL, and why")
    lookup.add_argument("value")
    lookup.add_argument("--config", type=Path, help="configuration file")
    lookup.add_argument("--offline", action="store_true", help=OFFLINE_HELP)
    lookup.set_defaults(func=cmd_feeds_lookup)
    firewall = sub.add_parser("firewall", help="blocklists for firewalls")
    fw_sub = firewall.add_subparsers(dest="firewall_command", required=True)
    nft = fw_sub.add_parser("nft", help="nftables sets of blocked IPs and CIDRs")
    nft.add_argument("--config", type=Path, help="configuration file")
    nft.add_argument("--table", default="egressgw", help="inet table (default egressgw)")
    nft.add_argument("--set", default="blocked", help="set name prefix (default blocked)")
    nft.add_argument("--feed", action="append", help="only this feed (repeatable)")
    nft.add_argument("--apply", action="store_true", help="load the sets with nft -f")
    nft.add_argument(
        "--allow-empty",
        action="store_true",
        help="render or load an empty set (refused by default: it empties the firewall's)",
    )
    nft.add_argument("--offline", action="store_true", help=OFFLINE_HELP)
    nft.set_defaults(func=cmd_firewall_nft)
    node = sub.add_parser("node", help="the per-node nftables rules (redirection, firewall)")
    node_sub = node.add_subparsers(dest="node_command", required=True)
    setup = node_sub.add_parser(
        "setup", help="install or update the rules (one transaction; idempotent)"
    )
    setup.add_argument("--config", type=Path, help="configuration file")
    setup.add_argument("--dry-run", action="store_true", help="print the nft script, load nothing")
    setup.set_defaults(func=cmd_node)
    teardown = node_sub.add_parser("teardown", help="remove the rules' table (idempotent)")
    teardown.add_argument("--config", type=Path, help="configuration file")
    teardown.set_defaults(func=cmd_node)
    status = node_sub.add_parser(
        "status", help="show whether the rules are installed (exit 3 if not)"
    )
    status.add_argument("--config", type=Path, help="configuration file")
    status.add_argument("-v", "--verbose", action="store_true", help="print the whole table")
    status.set_defaults(func=cmd_node)
    worker_process.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the egressgw command."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
