"""Shared pytest setup for attnseg.

* ``ATTNSEG_QUIET=1`` is set before attnseg is imported, so a missing extension does not warn
  once per worker; the tests report it themselves (below).
* ``@pytest.mark.requires_native`` marks a test that needs the compiled extension (attnseg._C).
  Without it the test is SKIPPED with ``attnseg.native_unavailable_reason()`` as the reason,
  unless ``ATTNSEG_REQUIRE_NATIVE=1`` (set by CI), where it FAILS instead: CI can never go
  green with the kernels missing.
* Every test starts from the same seed (autouse fixture), whatever ran before it.
"""

from __future__ import annotations

import os
import sys

os.environ["ATTNSEG_QUIET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import attnseg  # noqa: E402

# tests/ on sys.path for the shared helpers module, whatever pytest's import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SEED = 0
REQUIRE_NATIVE = os.environ.get("ATTNSEG_REQUIRE_NATIVE") == "1"

# Hypothesis profiles (tests/test_properties.py and the property tests of test_triton.py):
#   ci (default): derandomized, so CI draws the same examples on every run, and bounded;
#   thorough: random examples, THOROUGH_FACTOR times as many; ATTNSEG_HYPOTHESIS_PROFILE=thorough.
try:
    from hypothesis import HealthCheck, settings as _hyp_settings

    _hyp_settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    _hyp_settings.register_profile("thorough", derandomize=False, deadline=None, print_blob=True,
                                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    HYPOTHESIS_PROFILE = os.environ.get("ATTNSEG_HYPOTHESIS_PROFILE", "ci")
    _hyp_settings.load_profile(HYPOTHESIS_PROFILE)
except ImportError:  # hypothesis is a test extra; the property tests then fail to import
    HYPOTHESIS_PROFILE = "ci"
THOROUGH_FACTOR = 25


def examples(ci_count: int) -> int:
    """Examples per property test: ``ci_count`` under the ci profile, 25x that under thorough."""
    return ci_count * (THOROUGH_FACTOR if HYPOTHESIS_PROFILE == "thorough" else 1)


def _native_missing_message() -> str:
    return f"attnseg native extension not loaded: {attnseg.native_unavailable_reason()}"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "requires_native: needs the compiled attnseg._C ops; skipped without them, "
        "failed without them when ATTNSEG_REQUIRE_NATIVE=1",
    )
    config.addinivalue_line(
        "markers",
        "emulator: runs the CUDA kernels on the CPU through the SIMT emulator (tests/emu; compiled "
        "with g++ on first use, about a minute)",
    )


def pytest_report_header(config):
    state = "loaded" if attnseg.native_available() else _native_missing_message()
    return [
        f"attnseg {attnseg.__version__}: native extension {state}; "
        f"ATTNSEG_REQUIRE_NATIVE={'1' if REQUIRE_NATIVE else 'unset'}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    ]


def pytest_runtest_setup(item):
    if item.get_closest_marker("requires_native") is None or attnseg.native_available():
        return
    if not REQUIRE_NATIVE:
        pytest.skip(_native_missing_message())


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    # Reported as a failure of the test itself (call phase), not a setup error.
    if item.get_closest_marker("requires_native") is not None and not attnseg.native_available():
        pytest.fail(f"ATTNSEG_REQUIRE_NATIVE=1 but {_native_missing_message()}", pytrace=False)


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(SEED)
    yield
