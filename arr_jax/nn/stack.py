"""Identical blocks stored in the scan-over-layers layout: one module whose weights carry a leading
``layers`` axis, applied by one ``lax.scan`` (the layout of maxtext's and maxdiffusion's scanned layers).

Scanning blocks whose weights are stored one per block needs them stacked inside the program, a copy
of every block's weights on every device (5.2 GiB per device for FLUX.1-dev on v5p-8, the figure
`arr_jax.preflight` showed). `StackedBlocks` stores them stacked instead, so a scanned program reads
them in place. Checkpoints keep diffusers' per-block names: loading writes block ``i`` into row ``i``
(`arr_jax.convert.safetensors_io.load_into_model`), and `unstacked_modules` presents the model as if
its blocks were separate (``transformer_blocks.3.attn.to_q``) for LoRA export and import.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from arr_jax.nn.remat import checkpoint

STACK = "block"  # the attribute holding the stacked module: paths read transformer_blocks.block.attn...


class StackedBlocks(nnx.Module):
    """``n`` blocks of one structure as a single module whose every variable is stacked on a new axis 0.

    Build it from the blocks (`stack_blocks`); each variable keeps its type and metadata, with
    ``"layers"`` prepended to its logical ``axes`` (replicated by the default sharding rules).
    """

    def __init__(self, blocks: Sequence[nnx.Module]):
        split = [nnx.split(b) for b in blocks]
        graphdef = split[0][0]
        if any(g != graphdef for g, _ in split[1:]):
            raise ValueError("StackedBlocks needs blocks of one structure")
        self.count = len(blocks)
        states = [s for _, s in split]
        stacked = jax.tree.map(_stack_variables, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
        setattr(self, STACK, nnx.merge(graphdef, stacked))

    def __len__(self) -> int:
        return self.count

    def scan(self, carry: tuple, extra: tuple, *, remat) -> tuple:
        """``carry = block_i(*carry, *extra)`` for i = 0 .. n-1 as one ``lax.scan`` over the stacked weights
        (a single output is re-wrapped); each step rematerialised per ``remat`` (`arr_jax.nn.remat`)."""
        graphdef, state = nnx.split(getattr(self, STACK))

        def body(c, st):
            out = nnx.merge(graphdef, st)(*c, *extra)
            return (out if isinstance(out, tuple) else (out,)), None

        carry, _ = jax.lax.scan(checkpoint(body, remat), carry, state)
        return carry


def _stack_variables(*vs: nnx.Variable) -> nnx.Variable:
    values = [v.get_value() if hasattr(v, "get_value") else v.value for v in vs]
    meta = vs[0].get_metadata() if hasattr(vs[0], "get_metadata") else {}
    updates = {"axes": ("layers",) + tuple(meta["axes"])} if meta.get("axes") is not None else {}
    if isinstance(values[0], jax.ShapeDtypeStruct):  # an abstract model (nnx.eval_shape): stack the shapes
        stacked = jax.ShapeDtypeStruct((len(values),) + tuple(values[0].shape), values[0].dtype)
    else:
        stacked = jnp.stack(values)
    return vs[0].replace(stacked, **updates)


def stack_blocks(blocks: Sequence[nnx.Module]) -> nnx.Module:
    """``blocks`` as a `StackedBlocks` when there are several of one structure, else unchanged (e.g.
    LoRA on some blocks only: those run in a Python loop)."""
    blocks = list(blocks)
    if len(blocks) < 2:
        return nnx.List(blocks)
    graphdef = nnx.graphdef(blocks[0])
    if any(nnx.graphdef(b) != graphdef for b in blocks[1:]):
        return nnx.List(blocks)
    return StackedBlocks(blocks)


def run_blocks(blocks, carry: tuple, extra: tuple, *, remat) -> tuple:
    """Apply ``blocks`` in order (``carry = block(*carry, *extra)``): one scan for `StackedBlocks`, else a
    loop with each block rematerialised per ``remat``."""
    if isinstance(blocks, StackedBlocks):
        return blocks.scan(carry, extra, remat=remat)
    for block in blocks:
        graphdef, state = nnx.split(block)

        def fn(st, c, g=graphdef):
            out = nnx.merge(g, st)(*c, *extra)
            return out if isinstance(out, tuple) else (out,)

        carry = checkpoint(fn, remat)(state, carry)
    return carry


# ---------------------------------------------------------------------------- per-block views

class _Row:
    """Row ``i`` of a stacked variable, read and written like a variable (``get_value`` / ``set_value``)."""

    def __init__(self, var: nnx.Variable, i: int):
        self.var, self.i = var, i

    def get_value(self):
        return self.var.get_value()[self.i]

    def set_value(self, x) -> None:
        full = self.var.get_value()
        sharding = getattr(full, "sharding", None)
        new = full.at[self.i].set(jnp.asarray(x, full.dtype))
        self.var.set_value(jax.device_put(new, sharding) if sharding is not None else new)

    @property
    def shape(self):
        return self.var.get_value().shape[1:]

    @property
    def dtype(self):
        return self.var.get_value().dtype


class BlockView:
    """Block ``i`` of a stacked module, as far as LoRA export / import need it: each attribute that is a
    variable becomes its row (`_Row`), a sub-module a view, anything else (e.g. ``lora_scale``) as is."""

    def __init__(self, module: nnx.Module, i: int):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_i", i)

    def __getattr__(self, name: str) -> Any:
        x = getattr(self._module, name)
        if isinstance(x, nnx.Variable):
            return _Row(x, self._i)
        if isinstance(x, nnx.Module):
            return BlockView(x, self._i)
        return x

    @property
    def module(self) -> nnx.Module:
        """The stacked module this view reads."""
        return self._module


def unstacked_modules(model: nnx.Module, keep: Callable[[Any], bool] = lambda m: True) -> Iterator[tuple[str, Any]]:
    """``(dotted name, module)`` of every sub-module as if stacked blocks were separate: modules inside a
    `StackedBlocks` at ``transformer_blocks`` appear once per block, as ``transformer_blocks.<i>.<rest>``
    `BlockView` s. ``keep(module)`` filters on the underlying module."""
    stacked = {}
    for path, m in nnx.iter_modules(model):
        if isinstance(m, StackedBlocks):
            stacked[tuple(path)] = m
    for path, m in nnx.iter_modules(model):
        path = tuple(path)
        owner = next((p for p in stacked if path[:len(p) + 1] == p + (STACK,)), None)
        if owner is None:
            if not isinstance(m, StackedBlocks) and keep(m):
                yield ".".join(map(str, path)), m
            continue
        if not keep(m):
            continue
        rest = path[len(owner) + 1:]
        for i in range(stacked[owner].count):
            yield ".".join(map(str, owner + (i,) + rest)), BlockView(m, i)
