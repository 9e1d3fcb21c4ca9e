"""arr_jax: Auto-Rubric as Reward and Rubric Policy Optimization in JAX/Flax."""
__version__ = "0.1.0"
