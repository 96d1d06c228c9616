"""Print the architecture matrix (family × check) from a pytest JUnit report of the matrix tests.

Usage::

    .venv/bin/python -m pytest -q tests/test_architectures.py tests/test_generation.py -m "not slow" \
        --junitxml=runs/architectures.xml
    .venv/bin/python benchmarks/architecture_matrix.py runs/architectures.xml

Each cell is the outcome of one parametrised test (``pass``, ``FAIL``, ``error``, ``skipped``, or ``—`` when
the report has no such test), so the table is exactly what the test run said.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET

from cnt_lens.models import TESTED_FAMILIES

CHECKS = {
    "test_a_patch_writes_exactly_the_selected_neurons_hf_entries": "patch = donor's HF entries, bit-exact; revert",
    "test_activations_from_hook_in_equal_hook_post": "activations from hook_in = hook_post",
    "test_planted_neurons_are_recovered": "planted recall ≥ 0.95",
    "test_a_patched_model_exports_and_reloads_to_the_same_logits": "export → reload, logits ≤ 1e-4",
    "test_generation_matches_plain_hf_on_tiny_models": "greedy generation = plain HF",
}


def outcomes(path: str) -> dict[tuple[str, str], str]:
    """``{(test function, family): outcome}`` from a JUnit XML file."""
    found: dict[tuple[str, str], str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        m = re.fullmatch(r"(\w+)\[(\w+)\]", case.get("name", ""))
        if not m:
            continue
        tags = {child.tag for child in case}
        found[m.group(1), m.group(2)] = ("FAIL" if "failure" in tags else "error" if "error" in tags
                                         else "skipped" if "skipped" in tags else "pass")
    return found


def main(path: str) -> None:
    """Print the Markdown table."""
    got = outcomes(path)
    print("| family | " + " | ".join(CHECKS.values()) + " |")
    print("|---" * (len(CHECKS) + 1) + "|")
    for family in TESTED_FAMILIES:
        print(f"| {family} | " + " | ".join(got.get((test, family), "—") for test in CHECKS) + " |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
