"""Policy kinds: each turns a config into an `arr_jax.policies.base.Policy` for the trainer."""
from arr_jax.policies.base import Policy, PromptItem, as_items

__all__ = ["Policy", "PromptItem", "as_items"]
