"""requirements.lock: what the image installs, each package pinned with its hashes, made from
pyproject.toml as it is now (`bash scripts/lock.sh --check`, which the test command runs too), and
the Pythons the project names as supported."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = (ROOT / "requirements.lock").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PIN = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>\S+)(?: ; (?P<marker>.+?))? \\$", re.M)


def check(root: Path) -> subprocess.CompletedProcess[str]:
    """Run `scripts/lock.sh --check` in `root` with this Python."""
    return subprocess.run(
        ["bash", str(root / "scripts" / "lock.sh"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        check=False,
    )


def test_the_lock_was_made_from_pyproject_as_it_is_now() -> None:
    run = check(ROOT)
    assert run.returncode == 0, run.stderr


def copy_of_project(tmp_path: Path, edit: tuple[str, str]) -> Path:
    """Return a folder with the lock, the lock script and pyproject.toml with one edit made."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "lock.sh", tmp_path / "scripts" / "lock.sh")
    shutil.copy(ROOT / "requirements.lock", tmp_path / "requirements.lock")
    text = (ROOT / "pyproject.toml").read_text()
    old, new = edit
    assert text.count(old) == 1
    (tmp_path / "pyproject.toml").write_text(text.replace(old, new))
    return tmp_path


@pytest.mark.parametrize(
    "edit",
    [
        ("dependencies = [\n", 'dependencies = [\n    "six>=1.16",\n'),
        ('"orjson>=3.10,<4"', '"orjson>=3.11,<4"'),
        (
            "[project.optional-dependencies]\n",
            '[project.optional-dependencies]\nyaml = ["ruamel.yaml"]\n',
        ),
        ('requires = ["setuptools>=68"]', 'requires = ["setuptools>=70"]'),
        ('requires-python = ">=3.11"', 'requires-python = ">=3.12"'),
    ],
    ids=["a-new-dependency", "a-changed-range", "a-new-extra", "build-system", "requires-python"],
)
def test_a_changed_dependency_list_fails_the_check_saying_how_to_fix_it(
    tmp_path: Path, edit: tuple[str, str]
) -> None:
    run = check(copy_of_project(tmp_path, edit))
    assert run.returncode == 1
    assert "run bash scripts/lock.sh" in run.stderr


def test_the_dev_extra_is_not_in_the_image_so_changing_it_keeps_the_lock(tmp_path: Path) -> None:
    run = check(copy_of_project(tmp_path, ("dev = [\n", 'dev = [\n    "pytest-xdist>=3",\n')))
    assert run.returncode == 0, run.stderr


def pins() -> dict[str, str]:
    """Return each locked package's version by canonical name."""
    return {canonicalize_name(m["name"]): m["version"] for m in PIN.finditer(LOCK)}


def test_every_locked_package_is_pinned_with_at_least_one_hash() -> None:
    text = "\n".join(line for line in LOCK.splitlines() if not line.startswith("#"))
    requirements = re.split(r"\n(?=[A-Za-z0-9])", text.strip())
    assert len(requirements) == len(pins()) > 20
    for block in requirements:
        assert "==" in block.splitlines()[0]
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", block), block.splitlines()[0]


def test_every_runtime_extra_and_build_requirement_is_locked_within_its_range() -> None:
    wanted = [
        *PROJECT["dependencies"],
        *(
            r
            for name, extra in PROJECT["optional-dependencies"].items()
            if name != "dev"
            for r in extra
        ),
        *PYPROJECT["build-system"]["requires"],
    ]
    locked = pins()
    for line in wanted:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is not in requirements.lock"
        assert req.specifier.contains(locked[name], prereleases=True), (req, locked[name])


def test_the_dockerfile_installs_the_lock_with_hashes_then_the_project_alone() -> None:
    install_lock = DOCKERFILE.index("--require-hashes")
    assert "-r requirements.lock" in DOCKERFILE[install_lock : install_lock + 200]
    install_project = DOCKERFILE.index("--no-deps --no-build-isolation .")
    assert install_lock < install_project
    assert "COPY requirements.lock" in DOCKERFILE


def test_the_tests_python_and_the_images_python_are_both_named_as_supported() -> None:
    image = re.findall(r"^FROM python:(\d+\.\d+)-slim", DOCKERFILE, re.M)
    assert image and len(set(image)) == 1
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    classified = {
        c.rsplit(" :: ", 1)[1] for c in PROJECT["classifiers"] if re.search(r":: 3\.\d+$", c)
    }
    assert {"3.11", image[0]} <= classified
    assert here in classified
    requires = SpecifierSet(PROJECT["requires-python"])
    assert all(requires.contains(f"{v}.0") for v in classified)
