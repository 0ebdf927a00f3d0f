"""`gateway test`: load the config and the contract files, run every case, report."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import TextIO

from gateway.config import loader
from gateway.contracts.files import (
    ContractError,
    DefaultsFirst,
    contract_files,
    load_contract,
)
from gateway.contracts.model import Contract
from gateway.contracts.report import case_line, summary, write_junit
from gateway.contracts.run import Result, run_contracts
from gateway.core.errors import ConfigError, Problem

DEFAULT_PATHS = ("tests/contracts/",)


def run(
    config_path: str,
    paths: list[str],
    junit: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run the contracts in `paths` against the config; return 0 (all passed), 1 (a case
    failed) or 2 (a config or contract file is bad: nothing ran)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        text = Path(config_path).read_text(encoding="utf-8")
        loaded = loader.loads(text, config_path, DefaultsFirst(text, os.environ))
    except OSError as exc:
        print(Problem(config_path, 0, "(file)", f"cannot read: {exc.strerror}"), file=err)
        return 2
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=err)
        return 2
    files, problems = contract_files(paths or list(DEFAULT_PATHS))
    contracts: list[Contract] = []
    for file in files:
        try:
            contracts.append(load_contract(file, loaded.config))
        except ContractError as exc:
            problems.extend(exc.problems)
    if not files and not problems:
        problems.append(Problem(" ".join(paths), 0, "(file)", "no contract files (*.yaml) found"))
    if problems:
        for problem in problems:
            print(problem, file=err)
        return 2

    def report(result: Result) -> None:
        print(case_line(result), file=out, flush=True)

    results = asyncio.run(run_contracts(loaded, contracts, report))
    print(summary(results), file=out, flush=True)
    if junit is not None:
        write_junit(junit, results)
    return 0 if all(r.passed for r in results) else 1
