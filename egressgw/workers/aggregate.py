"""The workers' metrics as one set: Prometheus text expositions summed sample by sample (pure).

Samples with the same name and labels add up, whatever the family's type: counters, gauges
(open connections, tunnels), histogram buckets, sums and counts are all totals over the
processes. ``_created`` timestamps are left out (a sum of them means nothing). Families a
caller names in ``skip`` are dropped: the supervisor serves its own (reloads, readiness).
"""

from __future__ import annotations

from collections.abc import Iterable, Set

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]


class _Family:
    __slots__ = ("help", "samples", "type")

    def __init__(self, type_: str, help_: str) -> None:
        self.type = type_
        self.help = help_
        self.samples: dict[tuple[str, Labels], float] = {}


def aggregate(texts: Iterable[str], skip: Set[str] = frozenset()) -> str:
    """One exposition whose samples are the sums of the same samples in ``texts``."""
    families: dict[str, _Family] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if fam.name in skip:
                continue
            entry = families.get(fam.name)
            if entry is None:
                entry = families[fam.name] = _Family(fam.type, fam.documentation)
            samples = entry.samples
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                key = (s.name, tuple(sorted(s.labels.items())))
                samples[key] = samples.get(key, 0.0) + s.value
    return "".join(_render(name, fam) for name, fam in families.items())


def _number(value: float) -> str:
    """A sample value as the text format spells it (``+Inf``, ``NaN``, ``12.0``)."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _render(name: str, fam: _Family) -> str:
    help_text = fam.help.replace("\\", "\\\\").replace("\n", "\\n")
    lines = [f"# HELP {name} {help_text}\n# TYPE {name} {fam.type}\n"]
    for (sample, labels), value in fam.samples.items():
        if labels:
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{sample}{{{inner}}} {_number(value)}\n")
        else:
            lines.append(f"{sample} {_number(value)}\n")
    return "".join(lines)
