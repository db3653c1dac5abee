"""Turns a CustomResourceDefinition into the JSON Schema that tests/test_kubernetes_manifests.py
validates its resources against: the openAPIV3Schema of one served version, with the `description`
texts dropped (they are most of the CRD's bytes and no part of validation).

    python deploy/kubernetes/schemas/extract_crd_schema.py CRD.yaml v1 > deploy/kubernetes/schemas/NAME.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml


def strip_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        # A property may itself be named "description": only drop the keyword, whose value is a string.
        return {k: strip_descriptions(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def schema_of(crd: dict[str, Any], version: str) -> dict[str, Any]:
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return strip_descriptions(v["schema"]["openAPIV3Schema"])
    raise SystemExit(f"{crd['metadata']['name']} has no version {version}")


def main(argv: list[str]) -> int:
    path, version = argv
    with open(path) as f:
        crd = yaml.safe_load(f)
    json.dump(schema_of(crd, version), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
