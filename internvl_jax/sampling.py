"""Sampling parameters (vLLM's names and meanings) and the on-device sampler.

Every per-request knob is an array over the decode slots, never a static argument: changing a
temperature must not recompile anything. What the host knows about the whole batch picks one of three
compiled variants (`SAMPLING_MODES`), as vLLM's sampler takes its all-greedy path on the CPU: the device
never decides which code to run. A data-dependent `lax.cond` would: unless a CUDA graph captures it, XLA:GPU
copies its predicate to the host and waits for the stream. Measured on H200 with and without graphs, every
dispatch holding one returned only once the GPU had run everything queued before it, and the engine could not
prepare the next step while the GPU worked (docs/PERF.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

MAX_LOGPROBS = 20  # top-k logprobs a request may ask for (OpenAI's top_logprobs cap)
MAX_STOP_TOKEN_IDS = 16  # per request, enforced on the device for min_tokens


class SamplingError(ValueError):
    """Invalid sampling parameters: names the field and the accepted range."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k filtering
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob plus the top k
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        # Accept lists and single strings as vLLM does; store tuples so the params stay hashable.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))
        self.validate()

    def validate(self) -> None:
        def fail(field, message):
            raise SamplingError(f"{field}: {message}")

        if not isinstance(self.n, int) or self.n < 1:
            fail("n", f"must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            fail("temperature", f"must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            fail("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            fail("top_k", f"must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            fail("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            fail("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"{self.min_tokens} is greater than max_tokens={self.max_tokens}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            fail("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            fail("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            fail("stop", "must be non-empty strings")
        if self.seed is not None and not isinstance(self.seed, int):
            fail("seed", f"must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filters(self) -> bool:
        """Sampled with a top-k or top-p cut (which needs a sort of the vocabulary)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1)


# The sampler's variants, cheapest first: every row greedy (argmax only); some rows drawn but none cut by
# top-k / top-p (Gumbel noise, no sort); some row cut (noise and one sort of the vocabulary).
SAMPLING_MODES = ("greedy", "random", "filtered")


def sampling_mode(params) -> str:
    """The cheapest variant that samples every one of `params` (SamplingParams) exactly."""
    params = list(params)
    if all(p.greedy for p in params):
        return "greedy"
    return "filtered" if any(p.filters for p in params) else "random"


# ---- on the device ------------------------------------------------------------------------------


def _filter_top_k_top_p(logits_BV, top_k_B, top_p_B):
    """Masks (to -inf) the tokens outside each row's top-k and nucleus; one sort over the vocabulary."""
    sorted_desc = -jnp.sort(-logits_BV, axis=-1)
    vocab = logits_BV.shape[-1]
    k = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, vocab), vocab)
    kth_value = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: token i stays if the mass before it < top_p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_count = jnp.maximum(jnp.sum(mass_before < top_p_B[:, None], axis=-1), 1)
    # top_p = 1 keeps every token (the float sum may reach 1 before the tail): a row without a cut samples
    # the same token in every mode, whatever rows share its batch.
    keep_count = jnp.where(top_p_B >= 1, vocab, keep_count)
    nucleus_value = jnp.take_along_axis(sorted_desc, (keep_count - 1)[:, None], axis=-1)
    threshold = jnp.maximum(kth_value, nucleus_value)
    return jnp.where(logits_BV >= threshold, logits_BV, -jnp.inf)


def sample(logits_BV, temperature_B, top_p_B, top_k_B, keys_B2, step_B, mode: str = "filtered"):
    """int32[B] next tokens. Greedy rows (temperature 0) take the argmax; the others sample with the
    Gumbel-max trick from a key derived from (request seed, step), so a request's tokens do not
    depend on which other requests share its batch. `mode` (static, from `sampling_mode` of the rows'
    parameters) leaves out what no row needs; "filtered" is exact for any rows."""
    if mode not in SAMPLING_MODES:
        raise ValueError(f"sampling mode {mode!r}: use one of {SAMPLING_MODES}")
    logits_BV = logits_BV.astype(jnp.float32)
    best = jnp.argmax(logits_BV, axis=-1)
    if mode == "greedy":
        return best.astype(jnp.int32)
    greedy = temperature_B <= 0
    scaled = logits_BV / jnp.where(greedy, 1.0, temperature_B)[:, None]
    if mode == "filtered":
        scaled = _filter_top_k_top_p(scaled, top_k_B, top_p_B)  # rows without a cut keep every token
    step_keys = jax.vmap(jax.random.fold_in)(keys_B2, step_B)
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, (logits_BV.shape[-1],), jnp.float32))(step_keys)
    sampled = jnp.argmax(scaled + gumbel, axis=-1)
    return jnp.where(greedy, best, sampled).astype(jnp.int32)


def suppress_stop_tokens(logits_BV, stop_ids_BS, generated_B, min_tokens_B):
    """Before a request has `min_tokens` tokens, its EOS and stop token ids cannot be sampled."""
    active = (generated_B < min_tokens_B)[:, None] & (stop_ids_BS >= 0)
    rows = jnp.broadcast_to(jnp.arange(logits_BV.shape[0])[:, None], stop_ids_BS.shape)
    columns = jnp.where(active, stop_ids_BS, logits_BV.shape[-1])  # out of range: dropped
    return logits_BV.at[rows, columns].set(-jnp.inf, mode="drop")


def token_logprobs(logits_BV, tokens_B, want_top: bool):
    """(logprob of the chosen token [B], top-k logprobs [B, K], their ids [B, K]) from the raw model
    distribution (vLLM's default `raw_logprobs`). Without `want_top` nothing is computed (zeros): no
    request in the batch asked for logprobs."""
    batch = logits_BV.shape[0]
    if not want_top:
        return (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch, MAX_LOGPROBS), jnp.float32),
                jnp.zeros((batch, MAX_LOGPROBS), jnp.int32))
    logprobs = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens_B[:, None], axis=-1)[:, 0]
    top_values, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
    return chosen, top_values, top_ids.astype(jnp.int32)
