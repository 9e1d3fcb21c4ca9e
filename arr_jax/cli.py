"""Command-line plumbing shared by the entry points: ``--config`` file + overrides, validation, and
the one-line messages of the commonest mistakes (a missing config file, a mistyped key, a rubric file
not made yet, an API judge without a model).

    python -m arr_jax.cli configs/demo.py:tiny [rpo]    # every key of a config: default and a line of help
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

ROOT = Path(__file__).resolve().parents[1]
_CONFIGS = ROOT / "configs"
# Each entry point's embedded default config (``python -m arr_jax.<entry>`` with no --config).
_DEFAULTS = {"induce": "induce_world.py", "evaluate": "evaluate_world.py", "preflight": "flux_dev_t2i.py"}
# What `sample` can draw; `train` takes `arr_jax.policies.KINDS`.
SAMPLE_KINDS = ("flux", "flux_kontext", "qwen_image_edit", "qwen_image")


def entry_name() -> str:
    """The running entry point (``train`` for ``python -m arr_jax.train``), "" outside one."""
    import __main__

    spec = getattr(__main__, "__spec__", None)
    return (spec.name if spec is not None else "").rsplit(".", 1)[-1]


def _default_config() -> str:
    return str(_CONFIGS / _DEFAULTS.get(entry_name(), "demo.py"))


_DEFAULT = _default_config()
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "experiment config file (configs/*.py[:variant])",
                                          lock_config=True)
_SPEC: list[str] = []  # the --config argument as the user typed it (for hints)


def load_config(spec: str):
    """``get_config(variant)`` of ``FILE[:variant]``, what ``--config FILE[:variant]`` gives."""
    import importlib.util

    file, _, variant = spec.partition(":")
    mod_spec = importlib.util.spec_from_file_location(f"_arr_cfg_{Path(file).stem}", file)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def _leaf_keys(cfg, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        out.append(prefix + k)
        if hasattr(v, "items") and not isinstance(v, dict):
            out += _leaf_keys(v, prefix + k + ".")
    return out


def config_file_error(spec: str, cwd: str | Path | None = None) -> str | None:
    """The one-line message for a ``--config`` file that does not exist (None when it does); a
    relative path that exists beside this package gets its absolute form."""
    file = spec.partition(":")[0]
    p = Path(cwd or os.getcwd()) / file
    if p.is_file():
        return None
    msg = f"--config {spec}: no such file {p}"
    for cand in (ROOT / file, _CONFIGS / Path(file).name):
        if not Path(file).is_absolute() and cand.is_file():
            rest = spec[len(file):]
            return msg + f" (paths are relative to the current directory): pass --config {cand}{rest}"
    return msg + f" (the shipped configs are in {_CONFIGS})"


def unknown_key_error(spec: str, overrides: list[str]) -> str:
    """The one-line message for the first of ``overrides`` (``--config.<key>=...`` arguments) that
    names no key of config ``spec``, with the closest keys."""
    keys = []
    try:
        keys = _leaf_keys(load_config(spec))
    except Exception:  # noqa: BLE001 - the message without suggestions
        pass
    given = [a.split("=", 1)[0][len("--config."):] for a in overrides if a.startswith("--config.")]
    key = next((k for k in given if k not in keys), given[0] if given else "?")
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if not close:  # the right leaf under another section
        close = [k for k in keys if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:3]
    hint = f"; did you mean {' or '.join('--config.' + c for c in close)}?" if close else ""
    return f"--config.{key}: {spec} has no key {key!r}{hint} (`python -m arr_jax.cli {spec}` lists every key)"


def _user_flag_errors() -> None:
    """Make the --config flag's parse errors one line: absl prints a ``flags.Error`` as ``FATAL Flags
    parsing error: ...`` without a traceback, where ml_collections raises AttributeError / OSError."""
    flag = flags.FLAGS["config"]
    parse = flag._parse

    def checked(argument):
        _SPEC[:] = [str(argument)]
        msg = config_file_error(str(argument))
        if msg:
            raise flags.IllegalFlagValueError(msg)
        try:
            return parse(argument)
        except (AttributeError, KeyError):
            raise flags.IllegalFlagValueError(unknown_key_error(str(argument), sys.argv[1:])) from None

    flag._parse = checked


_user_flag_errors()


def config_spec() -> str:
    """The ``--config`` argument of this command as typed (the entry's default when none was)."""
    return _SPEC[0] if _SPEC else _DEFAULT


def config_from_flags():
    """The parsed config, validated (`validate`) and its input files checked (`check_inputs`)."""
    cfg = _CONFIG.value
    validate(cfg, entry_name())
    check_inputs(cfg, entry_name(), config_spec())
    return cfg


def validate(cfg, entry: str = "") -> None:
    """Value checks that ml_collections' type checks don't cover; errors name the key. ``entry``: the
    entry point (``train``, ``sample``, ...; "" checks as for training)."""
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
        need(cfg.judge.get("order_check_pairs", 0) >= 0, "judge.order_check_pairs", "must be >= 0 (0: no check)")
        need(0 <= cfg.judge.get("order_flip_warn", 0) <= 1, "judge.order_flip_warn", "must be in [0, 1]")
    if "kind" in cfg and "rpo" in cfg:
        from arr_jax.policies import KINDS

        kinds = SAMPLE_KINDS if entry == "sample" else sorted(KINDS)
        why = "" if entry == "sample" or cfg.kind not in SAMPLE_KINDS else " (it is for `python -m arr_jax.sample`)"
        need(cfg.kind in kinds, "kind", f"{cfg.kind!r} is not one of {list(kinds)}{why}")


# ------------------------------------------------------------------------------ input files and hints

def _same(a, b) -> bool:
    return Path(a).absolute().resolve() == Path(b).absolute().resolve()


def _shown(spec_file: Path, variant: str) -> str:
    shown = str(spec_file)
    if spec_file.is_absolute() and spec_file.is_relative_to(Path.cwd()):
        shown = str(spec_file.relative_to(Path.cwd()))
    return shown + (f":{variant}" if variant else "")


def rubric_maker(path: str | Path, spec: str = "") -> str | None:
    """The ``python -m arr_jax.induce --config ...`` command whose output is rubric file ``path``:
    the config in use (``spec``) when it has an ``induce`` section writing there, else a shipped
    config (``configs/*.py``, the same variant first); None when none writes there."""
    file, _, variant = spec.partition(":")
    cands = [(Path(file), variant)] if file else []
    for f in sorted(_CONFIGS.glob("*.py")):
        for v in dict.fromkeys([variant, "", "tiny", "api", "qwen3_vl"]):
            cands.append((f, v))
    for f, v in cands:
        try:
            c = load_config(f"{f}:{v}" if v else str(f))
        except Exception:  # noqa: BLE001 - not a config with this variant
            continue
        if "induce" in c and "workdir" in c.induce:
            out = Path(c.induce.workdir) / "rubric.txt"
        elif "induction" in c and "workdir" in c:
            out = Path(c.workdir) / "rubric.txt"
        else:
            continue
        if _same(out, path):
            if file and f != Path(file) and _same(Path(file).parent, f.parent):
                f = Path(file).parent / f.name  # beside the config in use, as the user wrote it
            return f"python -m arr_jax.induce --config {_shown(f, v)}"
    return None


def missing_rubric_error(path: str, key: str, spec: str, entry: str) -> str:
    """One line for rubric file ``path`` (config key ``key``) not existing: the command that makes
    it, and how to go without."""
    make = rubric_maker(path, spec)
    if make is None:
        make = (f"python -m arr_jax.induce --config configs/induce_world.py:api --config.data.path=<your pairs.jsonl> "
                f"--config.workdir={Path(path).parent}")
    without = ("--config.conditions=direct to evaluate the judge without a rubric" if entry == "evaluate"
               else f"--config.{key}='' to judge without a rubric (the paper's direct judge)")
    return (f"bad config value {key}: rubric file {path} does not exist; make it with `{make}` "
            f"(it writes {path}), or pass --config.{key}=<a rubric.txt>, or {without}")


def _rubric_exists(path: str) -> bool:
    p = Path(path)
    return p.exists() or p.with_suffix(".json").exists() or p.with_suffix(".txt").exists()


def check_inputs(cfg, entry: str = "", spec: str = "") -> None:
    """Checks of what a config points at, before anything is built: rubric files that must exist
    (with the command that makes them) and API judges without a model. Errors are ``ValueError`` /
    ``FileNotFoundError`` naming the key of ``cfg`` to set, with hints made from this config."""
    spec = spec or config_spec()
    if entry == "evaluate" and "rubric" in cfg and "rubric" in tuple(cfg.get("conditions", ())):
        if not cfg.rubric:
            raise ValueError("bad config value rubric: empty, but conditions include 'rubric'; pass "
                             "--config.rubric=<a rubric.txt> or --config.conditions=direct")
        if not _rubric_exists(cfg.rubric):
            raise FileNotFoundError(missing_rubric_error(cfg.rubric, "rubric", spec, entry))
    judges = []
    if entry not in ("demo", "sample", "induce", "evaluate", "pretrain") and "judge" in cfg and "kind" in cfg.judge:
        judges.append(("judge", cfg.judge))
        if "eval" in cfg and cfg.eval.get("judge", None) is not None and cfg.eval.judge.get("kind", ""):
            judges.append(("eval.judge", cfg.eval.judge))
    for key, j in judges:
        if j.get("rubric", "") and not _rubric_exists(j.rubric):
            raise FileNotFoundError(missing_rubric_error(j.rubric, f"{key}.rubric", spec, entry))
        if j.kind == "api" and not (j.get("model", "") or j.api.get("model", "") or os.environ.get("ARR_API_MODEL")):
            raise ValueError(f"bad config value {key}.model: {key}.kind is 'api' but no model is named; pass "
                             f"--config.{key}.model=<model, e.g. gpt-5> or set ARR_API_MODEL")
    if entry in ("induce", "evaluate") and "backend" in cfg and cfg.backend.get("kind", "") == "openai":
        if not (cfg.backend.openai.get("model", "") or os.environ.get("ARR_API_MODEL")):
            raise ValueError("bad config value backend.openai.model: backend.kind is 'openai' but no model is named; "
                             "pass --config.backend.openai.model=<model, e.g. gpt-5> or set ARR_API_MODEL")


def describe_keys(spec: str, grep: str = "") -> str:
    """Every key of config ``spec`` (``FILE[:variant]``) with its default and, where the config's
    source has one, the comment on the line that sets it; ``grep`` keeps the keys containing it."""
    cfg = load_config(spec)
    sources = [Path(spec.partition(":")[0])] + sorted(_CONFIGS.glob("*.py")) + [ROOT / "arr_jax/judge/factory.py"]
    dotted: dict[str, str] = {}  # "c.rpo.eta = 0.7  # ..." -> rpo.eta
    leaves: dict[str, str] = {}  # "k=2,  # ..." (a keyword of a section helper) -> k
    for src in sources:
        for line in src.read_text().splitlines() if src.is_file() else []:
            m = re.match(r"\s*c\.([\w.]+)\s*=[^=#\n][^#\n]*#\s*(.+)$", line)
            if m:
                dotted.setdefault(m.group(1), m.group(2).strip())
                continue
            for m in re.finditer(r"\b(\w+)\s*=[^=#\n][^#\n]*#\s*(.+)$", line):
                leaves.setdefault(m.group(1), m.group(2).strip())
    lines = [f"keys of {spec} (override any with --config.<key>=<value>):"]
    for key in _leaf_keys(cfg):
        node = cfg
        for part in key.split("."):
            node = node[part]
        if hasattr(node, "items") and not isinstance(node, dict):
            continue
        if grep and grep not in key:
            continue
        doc = dotted.get(key) or leaves.get(key.rsplit(".", 1)[-1], "")
        lines.append(f"  {key} = {node!r}" + (f"    # {doc}" if doc else ""))
    return "\n".join(lines)


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


def _resume_hint() -> str:
    """Where an interrupted run can be resumed from: the config's ``workdir`` checkpoints, if any."""
    try:
        workdir = _CONFIG.value.get("workdir", "")
    except Exception:  # noqa: BLE001 - no config parsed yet
        return ""
    if not workdir:
        return ""
    ckpts = Path(workdir) / "checkpoints"
    steps = sorted(int(p.name) for p in ckpts.glob("*") if p.is_dir() and p.name.isdigit()) if ckpts.is_dir() else []
    if not steps:
        return f"Nothing was checkpointed yet ({ckpts}); rerunning the same command starts again."
    return f"Rerun the same command to resume from iteration {steps[-1]} ({ckpts})."


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
        except KeyboardInterrupt:
            if _processes()[1] > 1:
                _fail_alone(130)
            print(f"interrupted (Ctrl-C). {_resume_hint()}", file=sys.stderr, flush=True)
            sys.exit(130)
        except BaseException as e:  # noqa: BLE001 - re-raised unless several processes run
            _peer_lost(e)
            _fail_alone(1, e)
            raise

    app.run(wrapped)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: python -m arr_jax.cli CONFIG[:variant] [FILTER]\n  lists the config's keys with their defaults and "
              "help; override any with --config.<key>=<value>")
        sys.exit(0)
    if config_file_error(sys.argv[1]):
        print(f"error: {config_file_error(sys.argv[1])}", file=sys.stderr)
        sys.exit(2)
    print(describe_keys(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""))
