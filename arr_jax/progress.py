"""Progress a person can see: one line per slow stage (loading weights, encoding prompts, compiling
a program, waiting on a judge), on process 0, on stderr.

    from arr_jax import progress

    with progress.stage("loading the policy (flux, /ckpt/FLUX.1-dev)"):
        policy = build_policy(cfg)            # "loading the policy (...) ..." then "... done in 12.3 s"
    progress.note("compiling the rollout program ...")
    rollout = progress.Announced(jax.jit(fn), "rollout")   # an `arr_jax.perf.Instrumented` that says
                                                            # "compiled rollout in 41.2 s" for each new
                                                            # input signature it compiles

Lines go through ``tqdm.write`` so they do not tear a progress bar that is on screen. Only process 0
writes (every process of a multi-host run does the same work). ``ARR_JAX_QUIET=1`` silences them,
for tests and scripts that compare output.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterator

from arr_jax.perf import Instrumented, _signature


def enabled() -> bool:
    """True on process 0 unless ``ARR_JAX_QUIET`` is set to 1/true/yes."""
    if os.environ.get("ARR_JAX_QUIET", "").strip().lower() in ("1", "true", "yes"):
        return False
    import jax

    return jax.process_index() == 0


def note(message: str) -> None:
    """Write one line on stderr (process 0 only; above any tqdm bar)."""
    if enabled():
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
        sys.stderr.flush()


@contextlib.contextmanager
def stage(what: str) -> Iterator[None]:
    """``what ...`` on entry and ``what: done in S s`` (wall seconds, one decimal) on a normal exit;
    nothing more when the block raises (its error says what went wrong)."""
    note(f"{what} ...")
    t0 = time.perf_counter()
    yield
    note(f"{what}: done in {time.perf_counter() - t0:.1f} s")


class Announced(Instrumented):
    """An `arr_jax.perf.Instrumented` program that says when it compiles: ``compiling <name> ...``
    before, and ``compiled <name> in S s`` (lower + compile seconds, `arr_jax.perf.ProgramCost`)
    after, once per new input signature. Calls with a known signature print nothing."""

    def __call__(self, *args, **kwargs):
        fresh = _signature(args, kwargs) not in self._compiled
        if fresh:
            note(f"compiling the {self.name} program{' again (new input shapes)' if self._compiled else ''} ...")
        out = super().__call__(*args, **kwargs)
        if fresh:
            note(f"compiled {self.name} in {self.last.lower_s + self.last.compile_s:.1f} s")
        return out
