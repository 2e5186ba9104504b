"""The CustomResourceDefinitions of deploy/crds: the contract's example objects (a copy of the
shared contract's k8s-resources.yaml, beside this file) validate against their schemas as the
API server would with strict field validation, bad objects do not, and the schemas name every
key of the gateway's own models."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import jsonschema
import pytest

from egressgw.config.model import DestinationSpec, ExpressionSpec, RuleSpec, SourceSpec
from feeds.options import ParseOptions
from feeds.spec import FeedSpec
from tests.deploy.support import DEPLOY, Obj, load_yaml_documents

EXAMPLES = Path(__file__).with_name("k8s-resources.yaml")


def crds() -> dict[str, Obj]:
    """The CRDs by kind."""
    out = {}
    for path in sorted((DEPLOY / "crds").glob("*.yaml")):
        for doc in load_yaml_documents(path):
            if doc.get("kind") == "CustomResourceDefinition":
                out[doc["spec"]["names"]["kind"]] = doc
    return out


def version(crd: Obj) -> Obj:
    """The one served version of a CRD."""
    (v,) = crd["spec"]["versions"]
    return dict(v)


def to_json_schema(node: Any) -> Any:
    """An OpenAPI v3 structural schema as JSON Schema, with the API server's strict field
    validation: unknown keys are refused; int-or-string and preserved fields as Kubernetes
    reads them."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def validator(kind: str) -> jsonschema.Draft4Validator:
    """A validator of a kind's objects."""
    schema = to_json_schema(version(crds()[kind])["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft4Validator(schema, format_checker=jsonschema.FormatChecker())


def examples() -> list[Obj]:
    """The contract's example objects."""
    return load_yaml_documents(EXAMPLES)


def test_contract_examples_validate_against_the_crds() -> None:
    """Every example object of the contract validates against its kind's schema."""
    objects = examples()
    assert {o["kind"] for o in objects} == {"GlobalEgressPolicy", "EgressPolicy", "ThreatFeed"}
    for obj in objects:
        assert obj["apiVersion"] == "egressgw.io/v1alpha1"
        errors = [e.message for e in validator(obj["kind"]).iter_errors(obj)]
        assert errors == [], (obj["metadata"]["name"], errors)


def test_contract_examples_load_as_gateway_models() -> None:
    """The examples' rules load as policy rules and the ThreatFeed as a feed definition, so the
    schemas accept nothing the gateway would refuse on these keys."""
    for obj in examples():
        if obj["kind"] == "ThreatFeed":
            FeedSpec.model_validate({"name": obj["metadata"]["name"], **obj["spec"]})
        else:
            for rule in obj["spec"]["rules"]:
                RuleSpec.model_validate(rule)


def _broken(kind: str, change: Any) -> list[str]:
    (obj,) = [o for o in examples() if o["kind"] == kind]
    obj = copy.deepcopy(obj)
    change(obj["spec"])
    return [e.message for e in validator(kind).iter_errors(obj)]


def test_schemas_refuse_misspelt_keys_and_bad_values() -> None:
    """A misspelt key, an unknown action, a tier-less GlobalEgressPolicy and an unknown feed
    format are refused."""
    assert _broken("EgressPolicy", lambda s: s["rules"][0].update(acton="allow"))
    assert _broken("EgressPolicy", lambda s: s["rules"][0].update(action="permit"))
    assert _broken("GlobalEgressPolicy", lambda s: s.pop("tier"))
    assert _broken("ThreatFeed", lambda s: s.update(format="xml"))
    assert _broken("ThreatFeed", lambda s: s.update(period="soon"))
    assert _broken("EgressPolicy", lambda s: s["rules"][0]["to"].update(ports=[443.5]))


@pytest.mark.parametrize("kind", ["EgressPolicy", "GlobalEgressPolicy", "ThreatFeed"])
def test_crd_has_status_subresource_and_printer_columns(kind: str) -> None:
    """Status is a subresource (the gateway writes it, users do not) with Accepted and Age
    columns; the status schema holds the Accepted condition."""
    crd = crds()[kind]
    assert crd["spec"]["group"] == "egressgw.io"
    v = version(crd)
    assert v["name"] == "v1alpha1" and v["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in v["additionalPrinterColumns"]}
    assert columns["Accepted"] == '.status.conditions[?(@.type=="Accepted")].status'
    assert columns["Age"] == ".metadata.creationTimestamp"
    status = v["schema"]["openAPIV3Schema"]["properties"]["status"]
    condition = status["properties"]["conditions"]["items"]
    assert {"type", "status", "reason", "message"} <= set(condition["properties"])
    scope = "Namespaced" if kind == "EgressPolicy" else "Cluster"
    assert crd["spec"]["scope"] == scope


def _aliases(model: Any) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


def test_schemas_name_every_key_of_the_models() -> None:
    """Rule, source, destination, expression, feed and format-option keys and their enums are
    those of the gateway's models (a key added to a model must be added to the CRD)."""
    policy_spec = version(crds()["GlobalEgressPolicy"])["schema"]["openAPIV3Schema"]
    rule = policy_spec["properties"]["spec"]["properties"]["rules"]["items"]
    assert set(rule["properties"]) == _aliases(RuleSpec)
    assert rule["properties"]["action"]["enum"] == list(
        get_args(RuleSpec.model_fields["action"].annotation)
    )
    source = rule["properties"]["from"]
    assert set(source["properties"]) == _aliases(SourceSpec)
    expression = source["properties"]["matchExpressions"]["items"]
    assert set(expression["properties"]) == _aliases(ExpressionSpec)
    assert set(rule["properties"]["to"]["properties"]) == _aliases(DestinationSpec)
    assert (
        version(crds()["EgressPolicy"])["schema"]["openAPIV3Schema"]["properties"]["spec"][
            "properties"
        ]["rules"]
        == policy_spec["properties"]["spec"]["properties"]["rules"]
    )
    feed = version(crds()["ThreatFeed"])["schema"]["openAPIV3Schema"]["properties"]["spec"]
    # The feed's name is the object's name.
    assert set(feed["properties"]) == _aliases(FeedSpec) - {"name"}
    assert set(feed["properties"]["options"]["properties"]) == _aliases(ParseOptions)
    for key in ("format", "kind", "severity", "special_ranges"):
        annotation = FeedSpec.model_fields[key].annotation
        # Literal[...] or Literal[...] | None
        literal = next(a for a in (annotation, *get_args(annotation)) if get_origin(a) is Literal)
        values = get_args(literal)
        assert feed["properties"][key]["enum"] == list(values), key
