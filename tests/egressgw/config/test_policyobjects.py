"""Policy resources judged and compiled: tiers, order, namespace scoping, refusals, status."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from egressgw.config import policyobjects as po
from egressgw.decision import policy
from egressgw.decision.policy import Destination
from egressgw.identity.workload import UNKNOWN, Workload

CONTRACT = Path(__file__).parents[2] / "integration" / "contract" / "k8s-resources.yaml"

FILE_RULE = policy.Rule(
    "file-rule", "deny", destination=policy.DestinationSelector(exact=frozenset({"f.example"}))
)
FILES = policy.Policy(
    (policy.Tier("security", (FILE_RULE,)), policy.Tier("apps", ())), default="deny"
)


def contract_objects() -> list[dict[str, Any]]:
    """The contract's example objects, as the API would hand them over."""
    out = []
    for obj in yaml.safe_load_all(CONTRACT.read_text()):
        obj["metadata"]["generation"] = 1
        out.append(obj)
    return out


def egress_policy(
    name: str, namespace: str, rules: list[dict[str, Any]], **spec: Any
) -> dict[str, Any]:
    """An EgressPolicy object."""
    return {
        "apiVersion": po.API_VERSION,
        "kind": po.POLICY,
        "metadata": {"name": name, "namespace": namespace, "generation": 1},
        "spec": {"rules": rules, **spec},
    }


def global_policy(name: str, rules: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    """A GlobalEgressPolicy object."""
    return {
        "apiVersion": po.API_VERSION,
        "kind": po.GLOBAL_POLICY,
        "metadata": {"name": name, "generation": 1},
        "spec": {"rules": rules, **spec},
    }


def to(name: str, port: int = 443) -> Destination:
    """A TLS destination by name."""
    return Destination(name, None, port, "tls")


API = Workload.make("payments", "api-1", {"app": "api"})
OTHER = Workload.make("shop", "api-1", {"app": "api"})


def test_contract_examples_are_accepted_and_work_as_written() -> None:
    """The contract's three objects are accepted; mining pools are denied for everyone, the PSP is
    allowed for payments' api only, the paste site is audited, and urlhaus becomes a feed."""
    judged = po.judge(contract_objects(), FILES, {"local-domains"})
    assert {k: v.accepted for k, v in judged.verdicts.items()} == {
        ("GlobalEgressPolicy", "", "security-block-crypto-miners"): True,
        ("EgressPolicy", "payments", "api-to-payment-provider"): True,
        ("ThreatFeed", "", "urlhaus"): True,
    }
    pol = judged.policy
    mined = pol.decide(API, to("eu.pool.example"))
    assert (mined.action, mined.rule_ref) == ("deny", "security/no-mining-pools")
    assert mined.origin == "GlobalEgressPolicy security-block-crypto-miners"
    psp = pol.decide(API, to("api.psp.example"))
    assert (psp.action, psp.rule_source) == (
        "allow",
        "apps/psp (EgressPolicy payments/api-to-payment-provider)",
    )
    assert pol.decide(OTHER, to("api.psp.example")).rule_ref == "default"
    assert pol.decide(API, to("api.psp.example", 80)).action == "deny"
    paste = pol.decide(API, to("paste.example"))
    assert paste.audits == ("would deny by security/audit-paste-sites",)
    [feed] = judged.feeds
    assert (feed.name, feed.period, feed.is_remote) == ("urlhaus", 900.0, True)


def test_files_rules_first_then_objects_by_order_then_name() -> None:
    """In a tier the files' rules come first, then objects by order, then by name."""
    objects = [
        global_policy("b", [{"name": "b", "action": "allow"}], tier="security", order=5),
        global_policy("a", [{"name": "a", "action": "allow"}], tier="security", order=5),
        global_policy("z", [{"name": "z", "action": "allow"}], tier="security", order=-1),
        egress_policy("a", "payments", [{"name": "n", "action": "allow"}], tier="security"),
    ]
    judged = po.judge(objects, FILES, ())
    names = [r.name for r in judged.policy.tiers[0].rules]
    assert names == ["file-rule", "z", "n", "a", "b"]
    assert judged.policy.tiers[1].rules == ()


def test_egress_policy_defaults_to_the_last_tier() -> None:
    """An EgressPolicy naming no tier joins the files' last tier."""
    judged = po.judge(
        [egress_policy("p", "payments", [{"name": "r", "action": "deny"}])], FILES, ()
    )
    assert [r.name for r in judged.policy.tiers[1].rules] == ["r"]


def test_egress_policy_from_naming_another_namespace_selects_nothing() -> None:
    """``from.namespace: shop`` in payments' EgressPolicy selects neither shop nor payments."""
    rule = {"name": "r", "action": "deny", "from": {"namespace": ["shop", "payments"]}}
    only_other = {"name": "o", "action": "deny", "from": {"namespace": "shop"}}
    judged = po.judge([egress_policy("p", "payments", [only_other, rule])], FILES, ())
    assert judged.policy.decide(OTHER, to("x.example")).rule_ref == "default"
    assert judged.policy.decide(API, to("x.example")).rule_ref == "apps/r"
    unknown = po.judge(
        [
            egress_policy(
                "p", "payments", [{"name": "u", "action": "allow", "from": {"unknown": True}}]
            )
        ],
        FILES,
        (),
    )
    assert unknown.policy.decide(UNKNOWN, to("x.example")).rule_ref == "default"


def _refusal(obj: dict[str, Any], feeds: tuple[str, ...] = ()) -> po.Verdict:
    (verdict,) = po.judge([obj], FILES, feeds).verdicts.values()
    assert not verdict.accepted
    return verdict


def test_invalid_objects_are_refused_with_the_key_and_the_problem() -> None:
    """Schema errors, unknown tiers and feeds, bad selectors, duplicate rule names and local feed
    files are refused, each message naming the key."""
    cases = [
        (
            egress_policy("p", "a", [{"name": "r", "action": "permit"}]),
            "InvalidSpec",
            "spec.rules[0].action: Input should be 'allow', 'deny' or 'pass'",
        ),
        (
            egress_policy("p", "a", [{"name": "r", "action": "deny", "form": {}}]),
            "InvalidSpec",
            "spec.rules[0].form: Extra inputs are not permitted",
        ),
        (
            global_policy("g", [{"name": "r", "action": "deny"}]),
            "InvalidSpec",
            "spec.tier: required in a GlobalEgressPolicy",
        ),
        (
            global_policy("g", [], tier="platform"),
            "UnknownTier",
            "spec.tier: no tier named 'platform' in the policy files (tiers: security, apps)",
        ),
        (
            egress_policy("p", "a", [{"name": "r", "action": "deny", "to": {"feeds": ["nope"]}}]),
            "UnknownFeed",
            "spec.rules[0].to.feeds[0]: no feed named 'nope' is configured",
        ),
        (
            egress_policy(
                "p",
                "a",
                [
                    {
                        "name": "r",
                        "action": "deny",
                        "from": {"matchExpressions": [{"key": "k", "operator": "In"}]},
                    }
                ],
            ),
            "InvalidSelector",
            "spec.rules[0].from.matchExpressions[0].values: In needs values",
        ),
        (
            egress_policy(
                "p", "a", [{"name": "r", "action": "deny"}, {"name": "r", "action": "allow"}]
            ),
            "InvalidSpec",
            "spec.rules[1].name: rule 'r' given twice",
        ),
        (
            egress_policy("p", "a", [{"name": "r", "action": "deny", "to": {"ports": ["99999"]}}]),
            "InvalidSpec",
            "spec.rules[0].to.ports",
        ),
    ]
    for obj, reason, message in cases:
        verdict = _refusal(obj)
        assert (verdict.reason, verdict.message[: len(message)]) == (reason, message), obj
    feed = {
        "apiVersion": po.API_VERSION,
        "kind": po.THREAT_FEED,
        "metadata": {"name": "f"},
        "spec": {"url": "/etc/passwd", "format": "lines"},
    }
    assert _refusal(feed).reason == "LocalSource"
    feed["spec"] = {"url": "https://x.example/l", "format": "lines"}
    assert _refusal(feed, ("f",)).message == "metadata.name: a configured feed is named 'f'"


def test_a_refused_edit_keeps_the_accepted_generation() -> None:
    """A broken edit of an accepted object is refused and its last good generation stays in force;
    deleting the object removes it."""
    good = egress_policy("p", "payments", [{"name": "r", "action": "allow"}])
    first = po.judge([good], FILES, ())
    assert first.policy.decide(API, to("x.example")).action == "allow"
    broken = copy.deepcopy(good)
    broken["metadata"]["generation"] = 2
    broken["spec"]["rules"][0]["action"] = "permit"
    second = po.judge([broken], FILES, (), first.in_force)
    verdict = second.verdicts[po.key_of(good)]
    assert not verdict.accepted and verdict.generation == 2
    assert verdict.message.endswith("; generation 1 stays in force")
    assert second.policy.decide(API, to("x.example")).action == "allow"
    gone = po.judge([], FILES, (), second.in_force)
    assert gone.policy.decide(API, to("x.example")).action == "deny"


def test_a_kept_generation_goes_when_its_tier_does() -> None:
    """A last good generation whose tier the files no longer have is dropped, not kept."""
    good = global_policy("g", [{"name": "r", "action": "allow"}], tier="apps")
    first = po.judge([good], FILES, ())
    files = policy.Policy((policy.Tier("security", ()),), "deny")
    second = po.judge([good], files, (), first.in_force)
    assert second.verdicts[po.key_of(good)].reason == "UnknownTier"
    assert second.in_force == {} and second.policy == files


def test_policies_may_name_threat_feeds_accepted_beside_them() -> None:
    """A rule naming a ThreatFeed's feed is accepted while that ThreatFeed is."""
    feed = {
        "apiVersion": po.API_VERSION,
        "kind": po.THREAT_FEED,
        "metadata": {"name": "late", "generation": 1},
        "spec": {"url": "https://x.example/l", "format": "lines"},
    }
    rule = global_policy(
        "g", [{"name": "r", "action": "deny", "to": {"feeds": ["late"]}}], tier="security"
    )
    assert all(v.accepted for v in po.judge([feed, rule], FILES, ()).verdicts.values())
    assert po.judge([rule], FILES, ()).verdicts[po.key_of(rule)].reason == "UnknownFeed"


def test_status_patch_only_when_the_condition_changes() -> None:
    """The Accepted condition is patched in when absent or different, not when shown already;
    the transition time moves only with the status, other conditions are kept."""
    obj: dict[str, Any] = egress_policy("p", "a", [])
    verdict = po.Verdict(True, "Accepted", "0 rules in tier 'apps', order 0", 1)
    patch = po.status_patch(obj, verdict, "2026-01-01T00:00:00Z")
    assert patch == {
        "status": {
            "observedGeneration": 1,
            "conditions": [
                {
                    "type": "Accepted",
                    "status": "True",
                    "reason": "Accepted",
                    "message": "0 rules in tier 'apps', order 0",
                    "observedGeneration": 1,
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
        }
    }
    obj["status"] = patch["status"]
    assert po.status_patch(obj, verdict, "2026-01-02T00:00:00Z") is None
    obj["status"]["conditions"].insert(0, {"type": "Other", "status": "True"})
    moved = po.status_patch(obj, po.Verdict(True, "Accepted", "new", 2), "2026-01-03T00:00:00Z")
    assert moved is not None
    other, accepted = moved["status"]["conditions"]
    assert other == {"type": "Other", "status": "True"}
    assert accepted["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    refused = po.status_patch(obj, po.Verdict(False, "InvalidSpec", "x", 2), "2026-01-04T00:00:00Z")
    assert refused is not None
    assert refused["status"]["conditions"][-1]["lastTransitionTime"] == "2026-01-04T00:00:00Z"


# -- namespace scoping, as a property ------------------------------------------------------------

NAMESPACES = ["a", "b"]
DOMAINS = ["x.example", "y.example", "*.example"]
LABELS = st.dictionaries(
    st.sampled_from(["app", "tier"]), st.sampled_from(["api", "web"]), max_size=2
)

rules_st = st.lists(
    st.fixed_dictionaries(
        {"action": st.sampled_from(["allow", "deny", "pass"])},
        optional={
            "audit": st.booleans(),
            "from": st.fixed_dictionaries(
                {},
                optional={
                    "namespace": st.sampled_from(["a", "b", ["a", "b"], ["b"]]),
                    "labels": LABELS,
                    "unknown": st.booleans(),
                },
            ),
            "to": st.fixed_dictionaries(
                {}, optional={"domains": st.lists(st.sampled_from(DOMAINS), max_size=2)}
            ),
        },
    ),
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(rules_st, st.sampled_from([None, "security", "apps"]), st.integers(-3, 3)),
        max_size=3,
    ),
    LABELS,
    st.sampled_from(["b", None]),
    st.sampled_from(["x.example", "y.example", "z.example", "a.x.example"]),
)
def test_an_egress_policy_never_decides_for_another_namespace(
    policies: list[tuple[list[dict[str, Any]], str | None, int]],
    labels: dict[str, str],
    namespace: str | None,
    name: str,
) -> None:
    """Whatever EgressPolicies namespace a holds, a workload of namespace b (or an unknown
    source) is decided exactly as by the files alone: action, rule and audits."""
    objects = []
    for i, (rules, tier, order) in enumerate(policies):
        named = [{"name": f"r{j}", **r} for j, r in enumerate(rules)]
        extra: dict[str, Any] = {"order": order}
        if tier is not None:
            extra["tier"] = tier
        objects.append(egress_policy(f"p{i}", "a", named, **extra))
    judged = po.judge(objects, FILES, ())
    assert all(v.accepted for v in judged.verdicts.values())
    w = Workload.make(namespace, "pod", labels) if namespace else UNKNOWN
    for port in (80, 443):
        alone = FILES.decide(w, to(name, port))
        combined = judged.policy.decide(w, to(name, port))
        assert (combined.action, combined.rule_ref, combined.audits, combined.origin) == (
            alone.action,
            alone.rule_ref,
            alone.audits,
            None,
        )
