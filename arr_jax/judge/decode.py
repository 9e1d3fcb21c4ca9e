"""Decoding for the Qwen3-VL judge: explicit KV cache, jitted prefill, ``lax.while_loop`` generate.

All functions are pure functions of ``(graphdef, state, ...)`` (``nnx.split`` once, jit once);
`Decoder` bundles the jitted programs for a model.

Layout:
  * prompts are left-padded to one length ``S`` (``attention_mask`` 0 on padding), so the last
    column is every row's last prompt token and decode steps write one shared cache slot;
  * `KVCache` holds stacked keys/values ``(L, B, T, KVH, D)``, ``valid (B, T)`` (slot holds a real
    token), the next write slot ``index`` and each row's next RoPE position ``next_pos (B,)``
    (``max prompt position + 1 + step``, the same for all three M-RoPE axes);
  * the cache is donated to prefill and generate, so updates happen in place.

`score_choices` is the pairwise-judge fast path: one cache-free forward over the prompt and the
log-softmax of the last position at the candidate tokens.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arr_jax.models.qwen3_vl import model_kwargs
from arr_jax.sharding import ShardingRules, shard

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: Array          # (L, B, T, KVH, D)
    v: Array          # (L, B, T, KVH, D)
    valid: Array      # (B, T) bool
    index: Array      # () int32, next slot to write
    next_pos: Array   # (B,) int32, RoPE position of the next token

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(cfg, batch: int, max_len: int, dtype=jnp.float32, rules: ShardingRules | None = None) -> KVCache:
    """An empty cache for ``batch`` rows of up to ``max_len`` tokens (created sharded under ``rules``).

    The program that makes it is compiled once per (shape, dtype, rules) (`_cache_maker`): a fresh
    ``jax.jit`` of a new closure per call recompiled it every time (~70 ms on CPU per prefill)."""
    t = cfg.text
    shape = (t.num_hidden_layers, batch, max_len, t.num_key_value_heads, t.head_dim)
    return _cache_maker(shape, jnp.dtype(dtype), rules)()


@functools.lru_cache(maxsize=32)
def _cache_maker(shape: tuple[int, ...], dtype, rules: ShardingRules | None):
    """The jitted maker of an empty `KVCache` with stacked keys/values of ``shape`` (cached)."""
    batch, max_len = shape[1], shape[2]

    def make():
        z = jnp.zeros(shape, dtype)
        z = shard(z, rules, "layers", "batch", "seq", "act_heads", None)
        return KVCache(k=z, v=z, valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32),
                       next_pos=jnp.zeros((batch,), jnp.int32))

    return jax.jit(make)


# ----------------------------------------------------------------------------- samplers


def greedy(logits: Array, key: Array | None = None) -> Array:
    """``(B, V)`` → ``(B,)`` argmax tokens."""
    del key
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sample_temperature(logits: Array, key: Array, temperature: float = 1.0) -> Array:
    """Sample from ``softmax(logits / temperature)`` (float32)."""
    return jax.random.categorical(key, logits.astype(jnp.float32) / temperature, axis=-1).astype(jnp.int32)


def top_p_filter(logits: Array, top_p: float) -> Array:
    """Keep the smallest set of top tokens whose probability mass reaches ``top_p``; others → -inf.

    (Tokens tied with the last kept logit are kept too.)
    """
    lf = logits.astype(jnp.float32)
    sorted_logits = -jnp.sort(-lf, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs          # mass strictly before each token
    cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(lf >= cutoff, lf, -jnp.inf)


def sample_top_p(logits: Array, key: Array, top_p: float = 0.9, temperature: float = 1.0) -> Array:
    return sample_temperature(top_p_filter(logits.astype(jnp.float32) / temperature, top_p), key, 1.0)


def sample(logits: Array, key: Array, temperature: float = 0.0, top_p: float = 1.0) -> Array:
    """Greedy when ``temperature == 0``, else temperature (and top-p when ``top_p < 1``) sampling."""
    if temperature == 0.0:
        return greedy(logits)
    if top_p < 1.0:
        return sample_top_p(logits, key, top_p, temperature)
    return sample_temperature(logits, key, temperature)


# ----------------------------------------------------------------------------- programs


def prefill(graphdef, state, inputs: dict[str, Array], cache: KVCache) -> tuple[Array, KVCache]:
    """Write the prompt into an empty ``cache``; return last-position logits ``(B, V)`` and the cache.

    ``inputs`` as from `arr_jax.models.qwen3_vl.prepare_inputs` (``input_ids (B, S)``,
    ``attention_mask``, ``positions (3, B, S)`` and the image arrays).
    """
    model = nnx.merge(graphdef, state)
    ids, am = inputs["input_ids"], inputs["attention_mask"] > 0
    s, t = ids.shape[1], cache.max_len
    valid = jax.lax.dynamic_update_slice(cache.valid, am, (0, 0))
    slots = jnp.arange(t)
    mask = (slots[None, :] <= jnp.arange(s)[:, None])[None] & valid[:, None, :]
    hidden, ck, cv = model.hidden_states(ids, inputs["positions"], am, cache_k=cache.k, cache_v=cache.v,
                                         cache_index=0, mask=mask, last_only=True,
                                         **model_kwargs(inputs))
    logits = model.logits(hidden[:, -1])
    pos = jnp.where(am[None], inputs["positions"], -1)
    next_pos = (jnp.max(pos, axis=(0, 2)) + 1).astype(jnp.int32)
    return logits, KVCache(k=ck, v=cv, valid=valid, index=jnp.asarray(s, jnp.int32), next_pos=next_pos)


def decode_step(graphdef, state, tokens: Array, cache: KVCache) -> tuple[Array, KVCache]:
    """Feed one token per row ``(B,)``; return logits ``(B, V)`` and the advanced cache."""
    model = nnx.merge(graphdef, state)
    b = tokens.shape[0]
    valid = jax.lax.dynamic_update_slice(cache.valid, jnp.ones((b, 1), bool), (0, cache.index))
    mask = (valid & (jnp.arange(cache.max_len)[None] <= cache.index))[:, None, :]
    positions = jnp.broadcast_to(cache.next_pos[None, :, None], (3, b, 1))
    hidden, ck, cv = model.hidden_states(tokens[:, None], positions, jnp.ones((b, 1), jnp.int32),
                                         cache_k=cache.k, cache_v=cache.v, cache_index=cache.index, mask=mask)
    logits = model.logits(hidden[:, 0])
    return logits, KVCache(k=ck, v=cv, valid=valid, index=cache.index + 1, next_pos=cache.next_pos + 1)


def generate_loop(graphdef, state, logits: Array, cache: KVCache, key: Array, stops: Array, *,
                  max_new_tokens: int, pad_id: int, temperature: float, top_p: float):
    """Sample up to ``max_new_tokens`` after a prefill, in one ``lax.while_loop``.

    ``stops`` ``(n,)`` int32 stop tokens (``-1`` entries never match). Returns
    ``(tokens (B, max_new_tokens) int32, lengths (B,), cache)``: each row stops after its first
    stop token (kept, like HF ``generate``) and is filled with ``pad_id`` afterwards.
    """
    b = logits.shape[0]

    def pick(lg, k, done):
        tok = sample(lg, k, temperature, top_p)
        tok = jnp.where(done, pad_id, tok)
        return tok, done | jnp.isin(tok, stops)

    key, k0 = jax.random.split(key)
    done0 = jnp.zeros((b,), bool)
    tok0, done = pick(logits, k0, done0)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok0)
    lengths = jnp.ones((b,), jnp.int32)

    def cond(c):
        step, _, done, *_ = c
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(c):
        step, out, done, lengths, tok, cache, key = c
        key, k = jax.random.split(key)
        lg, cache = decode_step(graphdef, state, tok, cache)
        new, done_new = pick(lg, k, done)
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, step))
        lengths = lengths + (~done).astype(jnp.int32)
        return step + 1, out, done_new, lengths, new, cache, key

    c = (jnp.asarray(1, jnp.int32), out, done, lengths, tok0, cache, key)
    _, out, _, lengths, _, cache, _ = jax.lax.while_loop(cond, body, c)
    return out, lengths, cache


def choice_logprobs(graphdef, state, inputs: dict[str, Array], candidate_ids: Array) -> Array:
    """Log-probabilities ``(B, C)`` of single-token candidates at the next position (one forward)."""
    model = nnx.merge(graphdef, state)
    logits = model(inputs["input_ids"], inputs["positions"], inputs["attention_mask"], last_only=True,
                   **model_kwargs(inputs))
    return jnp.take(jax.nn.log_softmax(logits, axis=-1), candidate_ids, axis=-1)


# ----------------------------------------------------------------------------- host-facing wrapper

_DEVICE_KEYS = ("input_ids", "attention_mask", "positions", "pixel_values", "pos_index", "pos_weight",
                "rope_pos", "patch_len", "image_index")


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
    """Left-pad token lists to one length: ``(ids (B, S), attention_mask (B, S))`` int32."""
    s = max(len(x) for x in seqs) if length is None else length
    ids = np.full((len(seqs), s), pad_id, np.int32)
    am = np.zeros((len(seqs), s), np.int32)
    for i, x in enumerate(seqs):
        if len(x) > s:
            raise ValueError(f"prompt of {len(x)} tokens exceeds the padded length {s}")
        if len(x):
            ids[i, s - len(x):] = x
            am[i, s - len(x):] = 1
    return ids, am


class Decoder:
    """Jitted prefill / generate / choice scoring for one `Qwen3VLForConditionalGeneration`.

    ``rules`` with a mesh shards the batch over ``("data", "fsdp")``; the model's state should
    already be placed (e.g. by `arr_jax.convert.qwen3_vl.load_qwen3_vl` with the same rules).
    """

    def __init__(self, model, rules: ShardingRules | None = None, cache_dtype=None, max_length: int | None = None):
        self.cfg = model.cfg
        self.max_length = max_length
        self.graphdef, self.state = nnx.split(model)
        self.rules = rules
        self.cache_dtype = cache_dtype or model.model.language_model.embed_tokens.embedding.dtype
        gd = self.graphdef
        self._prefill = jax.jit(functools.partial(prefill, gd), donate_argnums=(2,))
        self._generate = jax.jit(functools.partial(generate_loop, gd), donate_argnums=(2,),
                                 static_argnames=("max_new_tokens", "pad_id", "temperature", "top_p"))
        self._choices = jax.jit(functools.partial(choice_logprobs, gd))

    @property
    def context_limit(self) -> tuple[int, str]:
        """``(tokens, where it comes from)``: the most prompt + generated tokens a row may hold, the
        text config's ``max_position_embeddings`` or the smaller ``max_length`` given here."""
        limit = int(self.cfg.text.max_position_embeddings)
        if self.max_length is not None and self.max_length < limit:
            return int(self.max_length), "the configured max_length"
        return limit, "the text config's max_position_embeddings"

    def check_length(self, prompt_lengths, new_tokens: int) -> None:
        """Raise a ValueError naming the rows, lengths and limit when a prompt of ``prompt_lengths``
        tokens plus ``new_tokens`` does not fit in `context_limit`."""
        limit, where = self.context_limit
        lengths = np.asarray(prompt_lengths).reshape(-1)
        bad = np.flatnonzero(lengths + new_tokens > limit)
        if len(bad):
            i = int(bad[np.argmax(lengths[bad])])
            raise ValueError(
                f"prompt too long: row {i} has {int(lengths[i])} prompt tokens + {new_tokens} new tokens = "
                f"{int(lengths[i]) + new_tokens} > {limit}, {where}"
                + (f" ({len(bad)} of {len(lengths)} rows too long: {bad.tolist()[:8]})" if len(bad) > 1 else ""))

    @staticmethod
    def _prompt_lengths(inputs: dict[str, Any]) -> np.ndarray:
        am = inputs.get("attention_mask")
        if am is None:
            ids = np.asarray(inputs["input_ids"])
            return np.full(ids.shape[0], ids.shape[1])
        return (np.asarray(am) > 0).sum(-1)

    def _batch_devices(self) -> int:
        return int(np.prod([self.rules.mesh.shape[a] for a in np.atleast_1d(self.rules.rules["batch"])]))

    def _put(self, inputs: dict[str, Any]) -> dict[str, Array]:
        """Host inputs to devices: the batch axis sharded over the mesh's batch axes when it divides
        evenly, replicated otherwise (a short last batch)."""
        out = {}
        for k in _DEVICE_KEYS:
            if k not in inputs:
                continue
            v = np.asarray(inputs[k])
            axis = 1 if k == "positions" else 0
            if self.rules is not None and self.rules.mesh is not None and k not in (
                    "pixel_values", "pos_index", "pos_weight", "rope_pos", "patch_len") \
                    and v.shape[axis] % self._batch_devices() == 0:
                names = [None] * v.ndim
                names[axis] = "batch"
                out[k] = jax.device_put(v, self.rules.sharding(names))
            else:
                out[k] = jnp.asarray(v)
        return out

    def prefill(self, inputs: dict[str, Any], max_len: int) -> tuple[Array, KVCache]:
        b = np.asarray(inputs["input_ids"]).shape[0]
        self.check_length(self._prompt_lengths(inputs), 0)
        cache = init_cache(self.cfg, b, max_len, self.cache_dtype, self.rules)
        return self._prefill(self.state, self._put(inputs), cache)

    def generate(self, inputs: dict[str, Any], *, max_new_tokens: int, stop_tokens: Sequence[int] = (),
                 pad_id: int = 0, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 return_lengths: bool = False):
        """Tokens ``(B, max_new_tokens)`` (numpy) generated after each prompt (left-padded batch).

        A prompt whose tokens plus ``max_new_tokens`` exceed `context_limit` is a ValueError."""
        self.check_length(self._prompt_lengths(inputs), int(max_new_tokens))
        s = np.asarray(inputs["input_ids"]).shape[1]
        logits, cache = self.prefill(inputs, s + max_new_tokens)
        stops = np.full((max(len(stop_tokens), 1) + 3) // 4 * 4, -1, np.int32)  # bucketed: few recompiles
        stops[:len(stop_tokens)] = list(stop_tokens)
        toks, lengths, _ = self._generate(self.state, logits, cache, jax.random.key(seed), jnp.asarray(stops),
                                          max_new_tokens=int(max_new_tokens),
                                          pad_id=int(pad_id), temperature=float(temperature), top_p=float(top_p))
        toks = np.asarray(toks)
        return (toks, np.asarray(lengths)) if return_lengths else toks

    def score_choices(self, inputs: dict[str, Any], candidate_ids: Sequence[int]) -> np.ndarray:
        """Log-probs ``(B, C)`` of each single-token candidate as the next token after each prompt
        (the candidate needs one position too: a prompt must leave room for one token)."""
        self.check_length(self._prompt_lengths(inputs), 1)
        return np.asarray(self._choices(self.state, self._put(inputs), jnp.asarray(candidate_ids, jnp.int32)))
