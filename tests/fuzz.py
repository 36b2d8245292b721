"""Shared hypothesis settings for the property-based fuzz tests (issue 10).

CI runs every property with at least 200 examples, derandomized (the same examples on every run,
so a red CI reproduces); MOLMOE_FUZZ_EXAMPLES=N runs more, and MOLMOE_FUZZ_SEED=S draws a
different (still reproducible) set. Deadlines are off: the machine's load, not the code, decides
how long an example takes; the properties bound time and memory themselves where they matter.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES = max(200, int(os.environ.get("MOLMOE_FUZZ_EXAMPLES", "200")))
_SEED = os.environ.get("MOLMOE_FUZZ_SEED")

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=_SEED is None,
                database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def seeded(test):
    """Apply MOLMOE_FUZZ_SEED (when set) to a @given test."""
    if _SEED is None:
        return test
    from hypothesis import seed

    return seed(int(_SEED))(test)
