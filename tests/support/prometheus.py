"""Reading pypooler's /metrics in tests."""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict[str, list[Any]]:
    """Metric families by name -> samples."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def sample(samples: list[Any], name: str, **labels: str) -> float:
    found = [
        s.value for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]  # fmt: skip
    assert len(found) == 1, (name, labels, found)
    return float(found[0])
