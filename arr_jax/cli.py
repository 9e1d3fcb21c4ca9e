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


def _peer_lost(e: BaseException) -> None:
    """With several processes, a failed collective or heartbeat means another process died: say so,
    and leave at once (JAX's own shutdown would wait for the dead peer, then abort)."""
    import os
    import sys

    if os.environ.get("ARR_JAX_DISTRIBUTED") != "1":
        return
    import jax

    if jax.process_count() < 2 or type(e).__name__ not in ("JaxRuntimeError", "XlaRuntimeError"):
        return
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    print(f"error: process {jax.process_index()} of {jax.process_count()} stopped because a collective with "
          f"the other processes failed ({first}). Another process has probably died; rerun every process with "
          "the same command to resume from the last checkpoint.", file=sys.stderr, flush=True)
    os._exit(1)


def run_main(main) -> None:
    """absl entry: distributed start-up when asked, quiet library logs, user errors as one line."""
    import logging
    import os
    import sys

    from absl import logging as absl_logging

    def wrapped(argv):
        if os.environ.get("ARR_JAX_DISTRIBUTED") == "1":  # set by launch/*.sh on multi-host runs
            from arr_jax.distributed import distributed_init

            distributed_init()
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger("absl").setLevel(logging.WARNING)
        logging.getLogger("absl").addFilter(_QuietLibraries())
        try:
            return main(argv)
        except USER_ERRORS as e:
            if os.environ.get("ARR_JAX_TRACEBACK") == "1" or not _raised_by_arr_jax(e):
                _peer_lost(e)
                raise
            print(f"error: {e}\n(ARR_JAX_TRACEBACK=1 shows the traceback)", file=sys.stderr, flush=True)
            sys.exit(2)
        except Exception as e:  # noqa: BLE001 - re-raised unless a peer process is gone
            _peer_lost(e)
            raise

    app.run(wrapped)
