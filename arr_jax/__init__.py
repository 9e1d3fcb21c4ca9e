"""arr_jax: Auto-Rubric as Reward and Rubric Policy Optimization in JAX/Flax."""
__version__ = "0.1.0"


def distributed_init() -> dict:
    """Start JAX's distributed runtime when ``ARR_JAX_DISTRIBUTED=1`` (see `arr_jax.distributed`)."""
    from arr_jax.distributed import distributed_init as _init

    return _init()
