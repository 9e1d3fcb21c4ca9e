"""NNX variable filters shared by loaders, optimizers and checkpointing."""
from __future__ import annotations


def base_param_filter():
    """All ``nnx.Param`` variables except LoRA adapters (which no base checkpoint holds)."""
    from flax import nnx

    try:
        from arr_jax.nn.lora import LoRAParam
    except ImportError:  # LoRA module not present
        return nnx.Param
    return nnx.All(nnx.Param, nnx.Not(LoRAParam))
