"""Device mesh, logical-axis sharding rules and the one `shard()` helper.

Conventions (see DESIGN.md):
  * Mesh axes are ``("data", "fsdp", "tensor")``.
  * Every parameter is created with logical axis names in its metadata under the
    key ``axes``, e.g. ``nnx.Param(w, axes=("embed", "mlp"))``. We use our own key
    instead of flax's ``out_sharding`` so that flax never tries to shard eagerly
    with logical names it cannot resolve; `param_shardings` resolves them here.
  * One `ShardingRules` object maps logical names to mesh axes. It is passed
    explicitly (models keep a reference), never held in a global context.
  * Activations are constrained with ``shard(x, rules, *names)`` at block boundaries.
    Outside a mesh (plain CPU tests) it is the identity.

We build meshes with ``AxisType.Auto``: GSPMD propagates shardings from the
constrained boundaries, so model code needs no per-op ``out_sharding``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None

DEFAULT_RULES: dict[str, MeshAxes] = {
    # activations
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    # parameters
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "vocab": "tensor",
    "layers": None,
    "lora_rank": None,
    "norm": None,
    "channels": None,
}


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Maps logical axis names to mesh axes. Unknown names are an error."""

    rules: Mapping[str, MeshAxes] = dataclasses.field(default_factory=lambda: dict(DEFAULT_RULES))
    mesh: Mesh | None = None

    def __hash__(self) -> int:  # hashable, so graphdefs of models holding rules can be jit-static
        return hash((tuple(sorted((k, str(v)) for k, v in self.rules.items())), self.mesh))

    def __eq__(self, other) -> bool:
        return (isinstance(other, ShardingRules) and dict(self.rules) == dict(other.rules)
                and self.mesh == other.mesh)

    def spec(self, names: Sequence[str | None]) -> P:
        out = []
        for n in names:
            if n is None:
                out.append(None)
                continue
            if n not in self.rules:
                raise KeyError(f"logical axis {n!r} has no sharding rule; known: {sorted(self.rules)}")
            out.append(self.rules[n])
        return P(*out)

    def sharding(self, names: Sequence[str | None]) -> NamedSharding:
        if self.mesh is None:
            raise ValueError("ShardingRules has no mesh; build it with make_rules(mesh)")
        return NamedSharding(self.mesh, self.spec(names))

    def replace(self, **overrides: MeshAxes) -> "ShardingRules":
        r = dict(self.rules)
        r.update(overrides)
        return ShardingRules(rules=r, mesh=self.mesh)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh; ``-1`` on one axis takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n % known:
            raise ValueError(f"{n} devices cannot be split into data={data} fsdp={fsdp} tensor={tensor}")
        sizes[sizes.index(-1)] = n // known
    if int(np.prod(sizes)) != n:
        raise ValueError(f"mesh data*fsdp*tensor = {int(np.prod(sizes))} but there are {n} devices")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def make_rules(mesh: Mesh | None = None, **overrides: MeshAxes) -> ShardingRules:
    r = dict(DEFAULT_RULES)
    r.update(overrides)
    return ShardingRules(rules=r, mesh=mesh)


def shard(x: jax.Array, rules: ShardingRules | None, *names: str | None) -> jax.Array:
    """Constrain activation ``x`` to the logical ``names`` (one per dim). Identity without a mesh."""
    if rules is None or rules.mesh is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"shard(): {len(names)} names for an array of rank {x.ndim}")
    return jax.lax.with_sharding_constraint(x, rules.sharding(names))


def logical_axes_of(variable: Any) -> tuple[str | None, ...] | None:
    """The ``axes`` metadata of an nnx Variable (or None)."""
    try:
        meta = variable.get_metadata()
    except AttributeError:
        return None
    return meta.get("axes")


def param_shardings(state: Any, rules: ShardingRules) -> Any:
    """NamedSharding for every Variable in an nnx State (replicated when no ``axes``).

    Axes that do not divide the dimension evenly fall back to replication for that dim,
    so tiny test models work on any mesh.
    """
    from flax import nnx

    def one(v):
        value = v.get_value() if hasattr(v, "get_value") else v
        shape = getattr(value, "shape", ())
        names = logical_axes_of(v)
        if names is None or len(names) != len(shape):
            spec = P()
        else:
            spec = rules.spec(names)
            spec = P(*[_fit(ax, dim, rules.mesh) for ax, dim in zip(spec, shape)])
        return NamedSharding(rules.mesh, spec)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _fit(ax: MeshAxes, dim: int, mesh: Mesh) -> MeshAxes:
    if ax is None:
        return None
    axes = (ax,) if isinstance(ax, str) else tuple(ax)
    size = int(np.prod([mesh.shape[a] for a in axes]))
    return ax if dim % size == 0 else None


def batch_sharding(rules: ShardingRules, ndim: int) -> NamedSharding:
    """Shard the leading (batch) dim over ``("data", "fsdp")``; replicate the rest."""
    return rules.sharding(("batch",) + (None,) * (ndim - 1))
