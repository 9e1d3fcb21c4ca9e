"""Command-line plumbing shared by the entry points: ``--config`` file + overrides, validation."""
from __future__ import annotations

from pathlib import Path

from absl import app
from ml_collections import config_flags

_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Each entry point's embedded default config (``python -m arr_jax.<entry>`` with no --config).
_DEFAULTS = {"induce": "induce_world.py", "evaluate": "evaluate_world.py", "preflight": "flux_dev_t2i.py"}


def _default_config() -> str:
    import __main__

    spec = getattr(__main__, "__spec__", None)
    entry = (spec.name if spec is not None else "").rsplit(".", 1)[-1]
    return str(_CONFIGS / _DEFAULTS.get(entry, "demo.py"))


_DEFAULT = _default_config()
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "experiment config file (configs/*.py[:variant])",
                                          lock_config=True)


def config_from_flags():
    """The parsed config; ``lock_config`` makes an unknown override key an error naming the key."""
    cfg = _CONFIG.value
    validate(cfg)
    return cfg


def validate(cfg) -> None:
    """Value checks that ml_collections' type checks don't cover; errors name the key."""
    def need(ok, key, msg):
        if not ok:
            raise ValueError(f"bad config value {key}: {msg}")

    if "world" in cfg:
        need(cfg.world.image_size % cfg.model.patch_size == 0, "world.image_size",
             f"{cfg.world.image_size} not divisible by model.patch_size={cfg.model.patch_size}")
        for a, p in cfg.world.p_wrong.items():
            need(0 <= p <= 1, f"world.p_wrong.{a}", f"{p} not in [0, 1]")
            need(p + cfg.world.p_drop <= 1, f"world.p_wrong.{a}", f"p_wrong + p_drop = {p + cfg.world.p_drop} > 1")
    if "model" in cfg:
        m = cfg.model
        need(sum(m.rope_dims) == m.head_dim, "model.rope_dims", f"sum {sum(m.rope_dims)} != head_dim {m.head_dim}")
        need(m.heads >= 1 and m.head_dim >= 2, "model.heads", "must be positive")
    if "pretrain" in cfg:
        need(cfg.pretrain.steps >= 1, "pretrain.steps", "must be >= 1")
        need(cfg.pretrain.learning_rate > 0, "pretrain.learning_rate", "must be > 0")
    if "rpo" in cfg:
        need(cfg.rpo.iterations >= 1, "rpo.iterations", "must be >= 1")
        from arr_jax.rpo.trainer import rpo_settings

        rpo_settings(cfg.rpo).validate()
    if "eval" in cfg and "sampler" in cfg.eval:
        need(cfg.eval.sampler in ("sde", "ode"), "eval.sampler", f"{cfg.eval.sampler!r} is not 'sde' or 'ode'")
    if "judge" in cfg and "kind" in cfg.judge:
        from arr_jax.judge.factory import JUDGE_KINDS

        need(cfg.judge.kind in JUDGE_KINDS, "judge.kind", f"{cfg.judge.kind!r} is not one of {JUDGE_KINDS}")
        need(cfg.judge.symmetrize in ("off", "agree", "mean"), "judge.symmetrize",
             f"{cfg.judge.symmetrize!r} is not 'off', 'agree' or 'mean'")
        need(cfg.judge.prompt_rubrics in ("off", "generate"), "judge.prompt_rubrics",
             f"{cfg.judge.prompt_rubrics!r} is not 'off' or 'generate'")
        need(0 <= cfg.judge.max_failure_fraction <= 1, "judge.max_failure_fraction", "must be in [0, 1]")
    if "kind" in cfg and "rpo" in cfg:
        from arr_jax.policies import KINDS

        need(cfg.kind in KINDS, "kind", f"{cfg.kind!r} is not one of {sorted(KINDS)}")


class _QuietLibraries:
    """A logging filter: drops INFO/WARNING records of tensorflow-datasets (its "custom data
    configuration" and "no dataset_info.json" notes for our locally generated datasets)."""

    def filter(self, record) -> bool:
        return record.levelno >= 40 or "tensorflow_datasets" not in (record.pathname or "")


# What a user can fix: raised by arr_jax's own checks, shown as one "error: ..." line (exit 2)
# instead of a traceback. The same exception types raised inside a library keep their traceback;
# ARR_JAX_TRACEBACK=1 shows it for ours too.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _raised_by_arr_jax(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(
        str(Path(__file__).resolve().parent))


def _processes() -> tuple[int, int]:
    """``(index, count)`` of this process in a distributed run (``ARR_JAX_DISTRIBUTED=1``), else (0, 1)."""
    import os

    if os.environ.get("ARR_JAX_DISTRIBUTED") != "1":
        return 0, 1
    import jax

    try:
        return jax.process_index(), jax.process_count()
    except Exception:  # noqa: BLE001 - the runtime did not start: a single process as far as we know
        return 0, 1


def _leave(code: int) -> None:
    """Leave at once with ``code``: no atexit handlers, so no ``jax.distributed.shutdown()``, whose
    barrier would wait for peers that are themselves waiting in the next collective (b18)."""
    import os
    import sys

    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not keep the process alive
            pass
    os._exit(code)


# Words of a collective that failed because another process is gone (gloo on CPU, NCCL, the
# coordination service's heartbeat / barrier errors).
_PEER_FAILURES = ("Gloo ", "Connection closed by peer", "Connection reset by peer", "NCCL", "heartbeat",
                  "coordination service", "DEADLINE_EXCEEDED", "UNAVAILABLE:")


def _peer_lost(e: BaseException) -> None:
    """With several processes, a failed collective or heartbeat means another process died: say so,
    and leave at once (JAX's own shutdown would wait for the dead peer, then abort)."""
    import sys

    index, count = _processes()
    text = str(e)
    # XLA's runtime errors, and the ValueError jit raises when a gloo / NCCL collective loses its peer
    if count < 2 or not (type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError")
                         or any(m in text for m in _PEER_FAILURES)):
        return
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    print(f"error: process {index} of {count} stopped because a collective with "
          f"the other processes failed ({first}). Another process has probably died; rerun every process with "
          "the same command to resume from the last checkpoint.", file=sys.stderr, flush=True)
    _leave(1)


def _fail_alone(code: int, e: BaseException | None = None) -> None:
    """With several processes, a process that fails (its own exception, a user error, ``sys.exit``
    with a non-zero code) leaves at once instead of entering JAX's shutdown barrier: it prints its
    error (and the traceback, for exceptions that are not user errors), says that the other
    processes stop within the heartbeat timeout, and exits with ``code``. One process: returns."""
    import os
    import sys
    import traceback

    index, count = _processes()
    if count < 2:
        return
    if e is not None:
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    timeout = os.environ.get("ARR_JAX_HEARTBEAT_TIMEOUT", "60")
    print(f"error: process {index} of {count} failed (exit {code}); leaving now without waiting for the other "
          f"processes, which stop within the heartbeat timeout ({timeout} s). Rerun every process with the same "
          "command to resume from the last checkpoint.", file=sys.stderr, flush=True)
    _leave(code)


def _stop_on_signals() -> None:
    """With several processes: SIGTERM / SIGINT / SIGHUP stop this process at once, saying so, even while
    its main thread waits in a collective (a Python handler would only run once the collective
    returns, and JAX's preemption notifier otherwise swallows SIGTERM). The signal wakes a daemon
    thread through ``signal.set_wakeup_fd``; it prints one line and leaves with 128 + the signal."""
    import os
    import signal
    import sys
    import threading

    index, count = _processes()
    if count < 2 or threading.current_thread() is not threading.main_thread():
        return
    r, w = os.pipe()
    os.set_blocking(w, False)

    def watch():
        while True:
            got = os.read(r, 1)
            if not got:
                return
            num = got[0]
            try:
                name = signal.Signals(num).name
            except ValueError:
                name = f"signal {num}"
            if num not in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                continue
            print(f"error: process {index} of {count} received {name}; stopping now. The other processes "
                  "stop within the heartbeat timeout; rerun every process with the same command to resume "
                  "from the last checkpoint.", file=sys.stderr, flush=True)
            _leave(128 + num)

    threading.Thread(target=watch, name="arr_jax-signals", daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)  # the watcher thread acts; the main thread keeps waiting
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)


def run_main(main) -> None:
    """absl entry: distributed start-up when asked, quiet library logs, user errors as one line.

    With several processes a failing process never waits for its peers: an exception, a user error,
    a non-zero ``sys.exit`` or SIGTERM / SIGINT / SIGHUP print the error and leave at once
    (`_fail_alone`, `_stop_on_signals`); a process whose collective fails because a peer died says
    so and leaves (`_peer_lost`). A process that is killed or hangs (SIGKILL, SIGSTOP) stops
    heartbeating, and JAX's coordination service stops the others after ``ARR_JAX_HEARTBEAT_TIMEOUT``
    seconds (`arr_jax.distributed`)."""
    import logging
    import os
    import sys

    from absl import logging as absl_logging

    def wrapped(argv):
        if os.environ.get("ARR_JAX_DISTRIBUTED") == "1":  # set by launch/*.sh on multi-host runs
            from arr_jax.distributed import distributed_init

            distributed_init()
            _stop_on_signals()
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger("absl").setLevel(logging.WARNING)
        logging.getLogger("absl").addFilter(_QuietLibraries())
        try:
            return main(argv)
        except USER_ERRORS as e:
            if os.environ.get("ARR_JAX_TRACEBACK") == "1" or not _raised_by_arr_jax(e):
                _peer_lost(e)
                _fail_alone(1, e)
                raise
            print(f"error: {e}\n(ARR_JAX_TRACEBACK=1 shows the traceback)", file=sys.stderr, flush=True)
            _fail_alone(2)
            sys.exit(2)
        except SystemExit as e:
            if e.code not in (None, 0) and _processes()[1] > 1:
                if not isinstance(e.code, int):
                    print(e.code, file=sys.stderr, flush=True)  # what the interpreter would print
                _fail_alone(e.code if isinstance(e.code, int) else 1)
            raise
        except BaseException as e:  # noqa: BLE001 - re-raised unless several processes run
            _peer_lost(e)
            _fail_alone(1, e)
            raise

    app.run(wrapped)
