"""Fuzz: ``aot_function(f, nop)`` behaves exactly like eager on random programs
mixing views and in-place mutation (see ``fuzz_programs.py``).

Environment:
  AOTGRAD_FUZZ_EXAMPLES            examples to run (default 300)
  AOTGRAD_FUZZ_SEED                the seed (default 2026: CI runs the same programs
                                   every time; "random" for a fresh draw)
  AOTGRAD_FUZZ_ALLOW_UNSUPPORTED=1 don't count NotImplementedError("... not
                                   supported yet") as a failure: fuzz the
                                   supported subset only
  AOTGRAD_FUZZ_SHRINK=0            report the first failing example as found

A failure prints a reproducer: runnable source of the (shrunk) program.
Long campaigns: ``python tests/fuzz_programs.py --count N [--seed S]``.
"""

import os
import warnings

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

import aotgrad
from fuzz_programs import check_program, programs, shrink

EXAMPLES = int(os.environ.get("AOTGRAD_FUZZ_EXAMPLES", "300"))
SEED = os.environ.get("AOTGRAD_FUZZ_SEED", "2026")
SEED = None if SEED == "random" else SEED
ALLOW_UNSUPPORTED = os.environ.get("AOTGRAD_FUZZ_ALLOW_UNSUPPORTED", "") not in ("", "0")
SHRINK = os.environ.get("AOTGRAD_FUZZ_SHRINK", "1") not in ("", "0")

_phases = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target] + \
    ([Phase.shrink] if SHRINK else [])


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=SEED is not None,
          phases=_phases, print_blob=False, suppress_health_check=list(HealthCheck))
@given(programs())
def test_aot_function_matches_eager(program):
    # debug_assert: also every graph's invariants, and every fake result the
    # tracer's memo rebuilds (Note [A memo of fake results])
    with warnings.catch_warnings(), aotgrad.config.patch(debug_assert=True):
        warnings.simplefilter("ignore")
        result = check_program(program, allow_unsupported=ALLOW_UNSUPPORTED)
    if not result.ok:
        if SHRINK and _is_final_run():  # hypothesis shrank; cut dead steps it cannot drop
            program = shrink(program, result.kind, lambda p: check_program(
                p, allow_unsupported=ALLOW_UNSUPPORTED))
            result = check_program(program, allow_unsupported=ALLOW_UNSUPPORTED)
        raise AssertionError(
            f"aot_function(f, nop) differs from eager: {result.kind}\n\n"
            + program.reproducer(result.report()))


def _is_final_run() -> bool:
    try:
        from hypothesis.control import current_build_context
        return bool(current_build_context().is_final)
    except Exception:  # noqa: BLE001 - an older/newer hypothesis: skip the extra shrink
        return False


if SEED is not None:
    test_aot_function_matches_eager = hypothesis_seed(int(SEED))(test_aot_function_matches_eager)


@settings(max_examples=max(EXAMPLES // 3, 1), deadline=None, database=None,
          derandomize=SEED is not None, phases=_phases, print_blob=False,
          suppress_health_check=list(HealthCheck))
@given(programs())
def test_maximal_recomputation_matches_eager(program):
    """The same programs through min-cut at memory budget 0: the backward
    recomputes everything deterministic, which must not change any result."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = check_program(program, allow_unsupported=ALLOW_UNSUPPORTED,
                               impl="aotgrad-budget0")
    if not result.ok:
        raise AssertionError(
            f"min-cut at budget 0 differs from eager: {result.kind}\n\n"
            + program.reproducer(result.report()))


if SEED is not None:
    test_maximal_recomputation_matches_eager = hypothesis_seed(int(SEED) + 1)(
        test_maximal_recomputation_matches_eager)
