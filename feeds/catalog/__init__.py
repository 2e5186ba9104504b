"""Ready definitions of well-known public feeds, usable by name: ``catalog: feodo``.

Each entry holds the ``FeedSpec`` keys (without ``name``): URL, format, options, period and a
licence note. Periods respect what each publisher asks (abuse.ch: not more often than every
5 minutes; Spamhaus: at most hourly). Check each licence before commercial use; the notes are a
summary, not legal advice.
"""

from __future__ import annotations

from typing import Any

_ABUSE_CH = "abuse.ch terms of use (https://abuse.ch/terms-of-use/)"

CATALOG: dict[str, dict[str, Any]] = {
    "feodo": {
        "url": "https://feodotracker.abuse.ch/downloads/ipblocklist_recommended.txt",
        "format": "lines",
        "period": "15m",
        "severity": "high",
        "labels": ("botnet-c2",),
        "license": "CC0 (abuse.ch Feodo Tracker, https://feodotracker.abuse.ch/blocklist/)",
    },
    "urlhaus": {
        "url": "https://urlhaus.abuse.ch/downloads/csv_online/",
        "format": "csv",
        "period": "15m",
        "severity": "high",
        "labels": ("malware-download",),
        "options": {
            "column": "url",
            "first_seen_field": "dateadded",
            "reference_field": "urlhaus_link",
            "tags_field": "tags",
        },
        "license": _ABUSE_CH,
    },
    "urlhaus-hostfile": {
        "url": "https://urlhaus.abuse.ch/downloads/hostfile/",
        "format": "hosts",
        "period": "15m",
        "subdomains": False,
        "severity": "high",
        "labels": ("malware-download",),
        "license": _ABUSE_CH,
    },
    "threatfox": {
        "url": "https://threatfox.abuse.ch/export/csv/recent/",
        "format": "csv",
        "period": "15m",
        "severity": "high",
        "labels": ("threatfox",),
        "options": {
            "column": "ioc_value",
            "first_seen_field": "first_seen_utc",
            "reference_field": "reference",
            "tags_field": "tags",
            "confidence_field": "confidence_level",
        },
        "license": _ABUSE_CH,
    },
    "spamhaus-drop": {
        "url": "https://www.spamhaus.org/drop/drop_v4.json",
        "format": "spamhaus",
        "period": "12h",
        "severity": "high",
        "labels": ("hijacked-network",),
        "license": "Spamhaus DROP terms (https://www.spamhaus.org/drop/terms/)",
    },
    "spamhaus-dropv6": {
        "url": "https://www.spamhaus.org/drop/drop_v6.json",
        "format": "spamhaus",
        "period": "12h",
        "severity": "high",
        "labels": ("hijacked-network",),
        "license": "Spamhaus DROP terms (https://www.spamhaus.org/drop/terms/)",
    },
    "et-compromised": {
        "url": "https://rules.emergingthreats.net/blockrules/compromised-ips.txt",
        "format": "lines",
        "period": "6h",
        "severity": "medium",
        "labels": ("compromised-host",),
        "license": "Emerging Threats / Proofpoint (BSD-style notice in the ET rule files)",
    },
    "firehol-level1": {
        "url": "https://iplists.firehol.org/files/firehol_level1.netset",
        "format": "lines",
        "period": "1h",
        "severity": "medium",
        "labels": ("aggregated",),
        "license": "FireHOL aggregate: each source list's licence applies",
    },
    "stevenblack-hosts": {
        "url": "https://raw.githubusercontent.com/StevenBlack/hosts/master/hosts",
        "format": "hosts",
        "period": "24h",
        "subdomains": False,
        "severity": "low",
        "labels": ("ads", "tracking"),
        "license": "MIT (StevenBlack/hosts); sub-list licences quoted inline",
    },
    "phishing-army": {
        "url": "https://phishing.army/download/phishing_army_blocklist_extended.txt",
        "format": "lines",
        "period": "6h",
        "subdomains": False,
        "severity": "medium",
        "labels": ("phishing",),
        "license": "CC BY-NC 4.0 (non-commercial use only)",
    },
    "openphish": {
        "url": "https://openphish.com/feed.txt",
        "format": "lines",
        "period": "12h",
        "severity": "medium",
        "labels": ("phishing",),
        "license": "OpenPhish community feed terms (https://openphish.com/)",
    },
}
