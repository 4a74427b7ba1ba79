"""Shared fixtures for the Python tests: where the build, the test data and the tools are."""
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO


@pytest.fixture(scope="session")
def build_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("DEFKV_BUILD_DIR", REPO / "build"))


@pytest.fixture(scope="session")
def bin_dir(build_dir) -> pathlib.Path:
    d = build_dir / "bin"
    if not d.is_dir():
        pytest.fail(f"{d} does not exist: build first (scripts/test does)")
    return d


@pytest.fixture(scope="session")
def testdata() -> pathlib.Path:
    d = pathlib.Path(os.environ.get("DEFKV_TESTDATA", REPO.parent / "shared" / "testdata"))
    if not d.is_dir():
        if _in_ci():
            pytest.fail(f"test data folder {d} is missing, and CI=true requires it")
        pytest.skip(f"test data folder {d} is missing (set DEFKV_TESTDATA)")
    return d


@pytest.fixture(scope="session")
def tiny_models(repo_root, build_dir) -> pathlib.Path:
    """The tiny random models of tools/make_tiny_models.py (generated once, then reused)."""
    out = build_dir / "testdata" / "tiny"
    subprocess.run([sys.executable, str(repo_root / "tools" / "make_tiny_models.py"), "--out", str(out)], check=True)
    return out
