"""Checkpoints: a thin wrapper around orbax ``CheckpointManager``.

Each step directory holds three orbax items:

  * ``state``: the training state, flattened to ``{path: array}`` (typed PRNG keys stored
    as their ``key_data``), written with ``StandardSave`` so sharded arrays are saved by
    every process and restored straight into a target sharding;
  * ``meta``: JSON with, per leaf path, its shape and dtype (and PRNG impl for typed
    keys), plus an optional ``model_signature`` (e.g. the model config);
  * ``extra``: user JSON (data position, config, metrics).

Before restoring, the stored ``meta`` is compared with the target, so loading a checkpoint
written for a different model fails with a `CheckpointMismatchError` naming the paths,
instead of an opaque orbax/tensorstore error.

Orbax writes each step into a ``<step>.orbax-checkpoint-tmp-*`` directory and renames it
when complete, so a process killed mid-save leaves only a temporary directory, which is
ignored (and cleaned up by the next `Checkpointer`); the previous step stays restorable.

A step folder is also checked before it is trusted (an interrupted copy from a bucket, a full disk):
it must hold orbax's ``_CHECKPOINT_METADATA``, a readable ``meta`` and ``extra`` and the ``state``
item's index files. An incomplete folder is skipped with a warning naming it, and process 0 renames
it ``<step>.incomplete`` so that later saves of that step are possible; restore falls back to the
newest complete step. A folder that passes those checks but fails to read (a truncated array file)
is skipped the same way when `restore` was asked for the latest step.

`atomic_write_text` / `read_json` are the project's writers and readers of small state files
(reports, caches, markers): written to a temporary name and renamed, and validated on read.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from arr_jax.atomic import atomic_write_json, atomic_write_text, read_json  # noqa: F401 (re-exported)

PyTree = Any

_FORMAT = 1
_MAX_LISTED = 20
log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """The checkpoint's structure (paths, shapes, dtypes, model signature) differs from the target."""


# --------------------------------------------------------------------------- leaves


def _is_typed_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _path_str(path: tuple) -> str:
    """``blocks.0.kernel``; drops the trailing ``.value`` of nnx Variables."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _flatten(tree: PyTree) -> tuple[list[str], list[Any], Any]:
    """Leaf paths, leaves and treedef; paths must be unique."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [_path_str(p) for p, _ in pairs]
    if len(set(paths)) != len(paths):
        dup = sorted({p for p in paths if paths.count(p) > 1})
        raise ValueError(f"state has leaves with the same path string: {dup}")
    return paths, [leaf for _, leaf in pairs], treedef


def _leaf_info(x: Any) -> dict:
    """JSON-able shape/dtype description of one leaf (array, ShapeDtypeStruct or scalar)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    info = {"shape": [int(d) for d in x.shape], "dtype": str(x.dtype)}
    if _is_typed_key(x):
        info["key_impl"] = str(jax.random.key_impl(x)) if isinstance(x, jax.Array) else None
    return info


def _jsonable(x: Any) -> Any:
    """Converts numpy/jax scalars and arrays inside ``x`` to plain Python for JSON."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    return x


def _abstract(x: Any) -> Any:
    """The orbax restore target for one target leaf (typed keys → their key_data)."""
    if _is_typed_key(x):
        if isinstance(x, jax.Array):
            data = jax.random.key_data(x)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=data.sharding)
        # ShapeDtypeStruct of a key dtype: key_data adds trailing dims; a NamedSharding's
        # PartitionSpec leaves them replicated, so the same sharding fits.
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, (jax.ShapeDtypeStruct, np.ndarray, int, float)):
        return x
    return np.asarray(x)  # numpy scalars, bools


def _like(restored: Any, target_leaf: Any, info: dict) -> Any:
    """Rewraps typed keys and gives numpy scalars back their scalar type."""
    if info.get("key_impl") is not None:
        return jax.random.wrap_key_data(restored, impl=info["key_impl"])
    if isinstance(target_leaf, np.generic):
        return target_leaf.dtype.type(restored)
    return restored


# --------------------------------------------------------------------------- checks


def _fmt(info: dict, with_dtype: bool) -> str:
    shape = str(tuple(info["shape"]))
    return f"{shape} {info['dtype']}" if with_dtype else shape


def _structure_diff(stored: dict[str, dict], expected: dict[str, dict]) -> list[str]:
    lines = []
    for path in sorted(set(stored) | set(expected)):
        s, e = stored.get(path), expected.get(path)
        if s is None:
            lines.append(f"{path} missing from checkpoint (expected {_fmt(e, True)})")
        elif e is None:
            lines.append(f"{path} in checkpoint ({_fmt(s, True)}) but not in target")
        elif s["shape"] != e["shape"] or s["dtype"] != e["dtype"]:
            with_dtype = s["dtype"] != e["dtype"]
            lines.append(f"{path} stored {_fmt(s, with_dtype)} expected {_fmt(e, with_dtype)}")
    return lines


def _flat_dict(d: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat_dict(v, f"{prefix}.{k}"))
    return out


def _signature_diff(stored: Any, expected: Any) -> list[str]:
    s, e = _flat_dict(stored, "model_signature"), _flat_dict(expected, "model_signature")
    lines = []
    for key in sorted(set(s) | set(e)):
        if key not in s:
            lines.append(f"{key} missing from checkpoint (expected {e[key]!r})")
        elif key not in e:
            lines.append(f"{key} stored {s[key]!r} but not expected")
        elif s[key] != e[key]:
            lines.append(f"{key} stored {s[key]!r} expected {e[key]!r}")
    return lines


# --------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Saves and restores a training-state pytree plus JSON ``extra`` under ``directory``.

    Every process calls `save`/`restore` (orbax coordinates multi-host writes).
    ``model_signature`` (JSON: str or dict, e.g. the model config) is written with every
    save and, when set, must equal the stored one on restore.
    """

    def __init__(
        self,
        directory: str | epath.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = False,
        model_signature: Any = None,
    ):
        self.directory = epath.Path(directory)
        self.model_signature = json.loads(json.dumps(_jsonable(model_signature)))
        self._options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.FixedIntervalPolicy(save_interval_steps),
            preservation_policy=policies.LatestN(max_to_keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._mngr: ocp.CheckpointManager | None = None
        self._checked = False
        self._bad: set[int] = set()
        self.skipped: list[str] = []  # step folders found incomplete and skipped (named in a warning)

    # The manager is built lazily so that read-only use of a missing directory
    # (restore, latest_step) does not create it.
    def _manager(self) -> ocp.CheckpointManager:
        if self._mngr is None:
            if not self._checked:
                self._check_steps()
                self._checked = True
            self._mngr = ocp.CheckpointManager(self.directory, options=self._options)
        return self._mngr

    def _readable(self) -> bool:
        return self._mngr is not None or self.directory.exists()

    def _incomplete(self, step_dir: epath.Path) -> str | None:
        """Why the step folder cannot be a complete checkpoint, or None when it looks complete."""
        need = ["_CHECKPOINT_METADATA", "meta/metadata", "extra/metadata", "state/_METADATA"]
        missing = [n for n in need if not (step_dir / n).exists()]
        if missing:
            return f"missing {', '.join(missing)}"
        try:
            meta = json.loads((step_dir / "meta" / "metadata").read_text())
            json.loads((step_dir / "extra" / "metadata").read_text())
            json.loads((step_dir / "state" / "_METADATA").read_text())
        except (ValueError, UnicodeDecodeError) as e:
            return f"unreadable metadata ({e})"
        if not isinstance(meta, dict) or "leaves" not in meta:
            return "meta/metadata has no 'leaves'"
        if not any(p.name != "_METADATA" for p in (step_dir / "state").iterdir()):
            return "state holds no array data"
        return None

    def _set_aside(self, step: int, why: str) -> None:
        """Warn about an incomplete step folder; process 0 renames it ``<step>.incomplete[-N]``."""
        src = self.directory / str(step)
        dst = self.directory / f"{step}.incomplete"
        k = 1
        while dst.exists():
            dst, k = self.directory / f"{step}.incomplete-{k}", k + 1
        msg = f"checkpoint folder {src} is incomplete ({why}): skipped"
        if jax.process_index() == 0 and src.exists():
            try:
                src.rename(dst)
                msg += f" and moved to {dst}"
            except OSError as e:
                msg += f" (could not move it aside: {e})"
        log.warning(msg)
        print(f"warning: {msg}", flush=True)
        self.skipped.append(str(src))

    def _check_steps(self) -> None:
        """Set aside every step folder that is not a complete checkpoint (before orbax lists them)."""
        if not self.directory.exists():
            return
        for d in sorted(self.directory.iterdir(), key=lambda p: p.name):
            if d.is_dir() and d.name.isdigit():
                why = self._incomplete(d)
                if why is not None:
                    self._set_aside(int(d.name), why)

    # ----------------------------------------------------------------- save

    def save(self, step: int, state: PyTree, *, extra: dict | None = None, force: bool = False) -> bool:
        """Saves ``state`` (and JSON ``extra``) as ``step``; returns whether a save happened.

        Skipped (False) when ``step`` is off ``save_interval_steps`` unless ``force``.
        """
        step = int(step)
        mngr = self._manager()
        if not force and not mngr.should_save(step):
            return False
        paths, leaves, _ = _flatten(state)
        flat = {}
        for path, leaf in zip(paths, leaves):
            flat[path] = jax.random.key_data(leaf) if _is_typed_key(leaf) else leaf
        meta = {
            "format": _FORMAT,
            "leaves": {p: _leaf_info(x) for p, x in zip(paths, leaves)},
            "model_signature": self.model_signature,
        }
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(flat),
            meta=ocp.args.JsonSave(meta),
            extra=ocp.args.JsonSave(_jsonable(extra or {})),
        )
        return mngr.save(step, args=args, force=force)

    # ----------------------------------------------------------------- restore

    def metadata(self, step: int | None = None) -> dict:
        """The stored structural metadata (``leaves``, ``model_signature``) of ``step``."""
        step = self._resolve_step(step)
        return self._manager().restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, target: PyTree | None = None, step: int | None = None) -> tuple[PyTree, dict]:
        """Restores ``(state, extra)`` from ``step`` (default: the newest complete step; a newest step
        that fails to read is set aside with a warning and the one before it is tried).

        See `_restore` for ``target`` and the errors."""
        if step is not None:
            return self._restore(target, step)
        while True:
            latest = self._resolve_step(None)
            try:
                return self._restore(target, latest)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - orbax / tensorstore errors of a damaged folder
                self.close()
                self._set_aside(latest, f"reading it failed: {type(e).__name__}: {str(e)[:200]}")
                self._bad.add(latest)  # moved aside by process 0; skipped by listing everywhere

    def _restore(self, target: PyTree | None = None, step: int | None = None) -> tuple[PyTree, dict]:
        """Restores ``(state, extra)`` from ``step`` (default: latest).

        ``target`` is a pytree of arrays or ``jax.ShapeDtypeStruct`` (with ``.sharding`` to
        restore directly into sharded arrays); the result has its structure. Without a
        target, the state comes back as a flat ``{path: array}`` dict.
        Raises `CheckpointMismatchError` when the stored structure differs from ``target``
        and `FileNotFoundError` when there is no checkpoint.
        """
        step = self._resolve_step(step)
        meta = self.metadata(step)
        stored = meta["leaves"]
        where = self.directory / str(step)

        problems = []
        if self.model_signature is not None:
            problems += _signature_diff(meta.get("model_signature"), self.model_signature)
        if target is not None:
            paths, leaves, treedef = _flatten(target)
            expected = {p: _leaf_info(x) for p, x in zip(paths, leaves)}
            problems += _structure_diff(stored, expected)
        if problems:
            listed = problems[:_MAX_LISTED]
            if len(problems) > _MAX_LISTED:
                listed.append(f"... and {len(problems) - _MAX_LISTED} more")
            raise CheckpointMismatchError(
                f"checkpoint {where} was written for a different model:\n  " + "\n  ".join(listed)
            )

        if target is None:
            state_args = ocp.args.StandardRestore()
        else:
            state_args = ocp.args.StandardRestore({p: _abstract(x) for p, x in zip(paths, leaves)})
        restored = self._manager().restore(
            step, args=ocp.args.Composite(state=state_args, extra=ocp.args.JsonRestore())
        )
        flat = restored.state
        if target is None:
            state = {p: _like(v, None, stored[p]) for p, v in flat.items()}
        else:
            state = treedef.unflatten([_like(flat[p], x, stored[p]) for p, x in zip(paths, leaves)])
        return state, dict(restored.extra or {})

    def _resolve_step(self, step: int | None) -> int:
        if not self._readable():
            raise FileNotFoundError(f"no checkpoint found: directory {self.directory} does not exist")
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint found in {self.directory} (the directory holds no complete step)")
        if step is None:
            return max(steps)
        if int(step) not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; steps there: {steps}")
        return int(step)

    # ----------------------------------------------------------------- bookkeeping

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """All complete steps, ascending."""
        if not self._readable():
            return []
        mngr = self._manager()
        mngr.reload()
        return sorted(s for s in mngr.all_steps() if s not in self._bad)

    def wait(self) -> None:
        """Blocks until an async save has finished."""
        if self._mngr is not None:
            self._mngr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax resources."""
        if self._mngr is not None:
            self._mngr.close()
            self._mngr = None

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
