"""What a contract run prints (one line per case, the failure text indented, a summary) and
the JUnit XML file CI systems read."""

from __future__ import annotations

import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from itertools import groupby

from gateway.contracts.run import Result


def case_line(result: Result) -> str:
    """Return `PASS endpoint :: name (12 ms)`, or the FAIL line with its failure text indented."""
    word = "PASS" if result.passed else "FAIL"
    line = f"{word} {result.endpoint} :: {result.case} ({result.seconds * 1000:.0f} ms)"
    if result.passed:
        return line
    return line + "\n" + textwrap.indent(result.text(), "    ")


def summary(results: Sequence[Result]) -> str:
    """Return `N passed, M failed`."""
    passed = sum(r.passed for r in results)
    return f"{passed} passed, {len(results) - passed} failed"


def write_junit(path: str, results: Sequence[Result]) -> None:
    """Write JUnit XML: one testsuite per contract file, one testcase per case."""
    root = ET.Element("testsuites", name="gateway test")
    root.set("tests", str(len(results)))
    root.set("failures", str(sum(not r.passed for r in results)))
    root.set("time", f"{sum(r.seconds for r in results):.3f}")
    for file, group in groupby(results, key=lambda r: r.file):
        cases = list(group)
        suite = ET.SubElement(root, "testsuite", name=file)
        suite.set("tests", str(len(cases)))
        suite.set("failures", str(sum(not r.passed for r in cases)))
        suite.set("errors", "0")
        suite.set("time", f"{sum(r.seconds for r in cases):.3f}")
        for r in cases:
            case = ET.SubElement(suite, "testcase", classname=r.endpoint, name=r.case)
            case.set("file", file)
            case.set("time", f"{r.seconds:.3f}")
            if not r.passed:
                failure = ET.SubElement(case, "failure", message=r.failures[0])
                failure.text = r.text()
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
