"""Skips that say why, and that CI cannot take silently.

A test may skip where what it needs cannot exist (no GPU, running as root, an opt-in extra such as
nncf). A dependency the suite relies on (tritonclient, a runnable tritonserver, the console
scripts) may be missing on the lent GPU machine, so there it skips with its reason; in CI
(``HADES_TEST_STRICT=1``, set by .ci/run) the same condition is an error.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

STRICT_ENV = "HADES_TEST_STRICT"


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def require_module(name: str, reason: str) -> ModuleType:
    """Import `name`; if it is missing, skip (with `reason`) or, under HADES_TEST_STRICT, fail."""
    if strict():
        return importlib.import_module(name)  # ImportError: a collection error, never a skip
    return pytest.importorskip(name, reason=reason)


def skip_or_fail(reason: str) -> None:
    """Skip with `reason`; under HADES_TEST_STRICT the missing requirement is a failure instead."""
    if strict():
        pytest.fail(f"{reason} ({STRICT_ENV}=1: required here, not skippable)", pytrace=False)
    pytest.skip(reason)
