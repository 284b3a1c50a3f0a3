"""Lean batch-1 token generation for Hugging Face causal LMs on CPU.

``generate_ids(model, prompt_ids, config, eos_token_ids)`` yields new token ids one at a time.

Where the time went in ``model.generate`` (bench/roofline.py measures it): at batch 1 a decode
step is a chain of GEMVs, and (1) stock ``F.linear`` in bf16 re-packs the weight into oneDNN's
blocked layout on every call, so it streams weights at ~60% of what the kernel can do on a
prepacked weight; (2) generate's bookkeeping, the mask/cache machinery and module calls add a
fixed cost per token that dominates on small models. So:

* ``prepare_for_decoding`` packs every bf16 ``nn.Linear`` once into oneDNN's blocked layout
  (``PackedLinear``, bit-identical outputs, no extra memory) - this also speeds up
  ``model.generate`` and any other forward;
* ``LlamaRunner`` is a flat Llama forward with the same aten ops as transformers'
  LlamaForCausalLM + sdpa (so greedy output matches ``model.generate`` token for token), over a
  preallocated KV cache, computing logits for the last position only;
* ``HFRunner`` is the generic path for any causal LM whose forward takes input_ids /
  position_ids / past_key_values (``cache`` on transformers 5.x) / use_cache;
* ``sample_next`` is separate from the forward step, so a later batched scheduler can keep one
  runner (one KV cache) per sequence and sample per sequence.

Works on torch 2.8 - 2.13 and transformers 4.51 - 5.x.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# NeuralChat GenerationConfig defaults; used when `config` lacks an attribute or it is None.
DEFAULTS: dict[str, Any] = {
    "temperature": 0.1,
    "top_k": 40,
    "top_p": 0.75,
    "repetition_penalty": 1.1,
    "max_new_tokens": 256,
    "do_sample": True,
    "num_beams": 1,
}

try:  # transformers >= 4.48
    from transformers.integrations.sdpa_attention import sdpa_attention_forward as _hf_sdpa
except ImportError:  # pragma: no cover
    _hf_sdpa = None


def _opt(config: Any, name: str) -> Any:
    value = getattr(config, name, None)
    return DEFAULTS[name] if value is None else value


# -------------------------------------------------------------------------------------------------
# Sampling: the processors, order and semantics of transformers' generate - repetition penalty
# (prompt + generated ids) -> temperature -> top-k -> top-p -> multinomial; greedy = argmax after
# the repetition penalty.


def apply_repetition_penalty(
    logits: torch.Tensor, previous_ids: torch.Tensor, penalty: float
) -> torch.Tensor:
    """In place on 1-D float logits: divide positive / multiply negative scores of seen tokens."""
    if penalty == 1.0 or previous_ids.numel() == 0:
        return logits
    ids = previous_ids[previous_ids < logits.numel()]  # like HF: no penalty for ids past the head
    score = logits.gather(0, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter_(0, ids, score)  # duplicate ids write the same value


def sample_next(
    logits: torch.Tensor,
    previous_ids: torch.Tensor,
    config: Any,
    generator: torch.Generator | None = None,
) -> int:
    """The next token from the last position's logits ([vocab] float32, modified in place).

    previous_ids: 1-D int64 tensor of prompt + generated ids, for the repetition penalty.
    """
    logits = apply_repetition_penalty(
        logits, previous_ids, float(_opt(config, "repetition_penalty"))
    )
    temperature = float(_opt(config, "temperature"))
    # transformers rejects temperature <= 0 when sampling; here it simply means greedy.
    if not _opt(config, "do_sample") or temperature <= 0.0:
        return int(torch.argmax(logits))
    if temperature != 1.0:
        logits = logits / temperature

    # top-k: transformers keeps every token scoring >= the k-th largest (ties included) and sets
    # the rest to -inf. Continuing with only those candidates gives the same distribution for
    # softmax / top-p / multinomial, and avoids sorting the whole vocab for top-p every token.
    top_k = int(_opt(config, "top_k"))
    cand_ids: torch.Tensor | None = None
    cand = logits
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k, sorted=False).values.min()
        cand_ids = torch.nonzero(logits >= kth).squeeze(1)
        cand = logits[cand_ids]

    # top-p: sort ascending, drop tokens whose cumulative probability is <= 1 - top_p, keep the top.
    top_p = float(_opt(config, "top_p"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(cand, descending=False)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= (1.0 - top_p)
        remove[-1] = False
        keep = order[~remove]
        cand = cand[keep]
        cand_ids = keep if cand_ids is None else cand_ids[keep]

    choice = int(torch.multinomial(cand.softmax(-1), 1, generator=generator))
    return choice if cand_ids is None else int(cand_ids[choice])


# -------------------------------------------------------------------------------------------------
# Weight prepacking


def _mkldnn_bf16_ok() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose bf16 weight is stored in oneDNN's blocked layout for batch-1 GEMV.

    Why: stock ``F.linear`` on a plain bf16 weight makes oneDNN repack the weight on every call;
    with the packed weight the same kernel streams weights ~1.6x faster (bench/roofline.py) and
    returns bit-identical results. The packed tensor replaces the plain one (same bytes), so
    memory does not grow. Modules are converted in place (class swap) by
    ``prepare_for_decoding``; anything that goes through nn.Module's conversion or loading
    machinery (``.to()``, ``.float()``, ``load_state_dict``) first turns the layer back into a
    plain ``nn.Linear``, and the next ``prepare_for_decoding`` packs it again.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)  # weight was re-bound to a plain tensor

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.is_mkldnn:  # checkpoints hold the plain layout
            destination[prefix + "weight"] = self.weight.to_dense()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        _unpack(self)
        self._load_from_state_dict(*args, **kwargs)

    def _apply(self, *args: Any, **kwargs: Any) -> nn.Module:
        _unpack(self)
        return self._apply(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> nn.Module:
        # Parameter.__deepcopy__ cannot clone an mkldnn tensor: copy a plain twin, pack that.
        packed = self.weight
        self._parameters["weight"] = nn.Parameter(packed.to_dense(), requires_grad=False)
        self.__class__ = nn.Linear
        try:
            twin = copy.deepcopy(self, memo)
        finally:
            self._parameters["weight"] = packed
            self.__class__ = PackedLinear
        _pack(twin)
        return twin


# (out, in, dtype, has bias, threads) -> do packed and plain weights give identical outputs here?
_PACK_IS_EXACT: dict[tuple[Any, ...], bool] = {}


def _pack_key(lin: nn.Linear) -> tuple[Any, ...]:
    w = lin.weight
    return (*w.shape, w.dtype, lin.bias is not None, torch.get_num_threads())


def _outputs_match(lin: nn.Linear, packed: torch.Tensor) -> bool:
    """Does the packed weight reproduce F.linear bit for bit, for decode and prefill shapes?

    On torch 2.13 both run the same oneDNN kernel (F.linear just re-packs per call) and always
    match; on torch 2.8 some shapes do not. Packing only where it is exact keeps
    prepare_for_decoding a pure speed-up: the model's outputs (and so greedy generations) do not
    change. Checked once per weight shape on random inputs.
    """
    g = torch.Generator().manual_seed(0)
    for rows in (1, 4, 32):
        x = torch.randn(1, rows, lin.in_features, generator=g).to(lin.weight.dtype)
        plain = F.linear(x, lin.weight, lin.bias)
        if not torch.equal(
            plain, torch.ops.mkldnn._linear_pointwise(x, packed, lin.bias, "none", [], "")
        ):
            return False
    return True


def _pack(lin: nn.Linear) -> None:
    key = _pack_key(lin)
    if _PACK_IS_EXACT.get(key) is False:
        return
    packed = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), 1)  # batch-size hint 1
    if key not in _PACK_IS_EXACT:
        _PACK_IS_EXACT[key] = _outputs_match(lin, packed)
        if not _PACK_IS_EXACT[key]:
            return
    lin.weight = nn.Parameter(packed, requires_grad=False)
    lin.__class__ = PackedLinear


def _unpack(lin: nn.Linear) -> None:
    if lin.weight.is_mkldnn:
        lin.weight = nn.Parameter(lin.weight.to_dense(), requires_grad=False)
    lin.__class__ = nn.Linear


# A packed-weight call costs ~25 us more fixed overhead than F.linear (~3 us) but then streams
# weights ~2x faster; below ~256 KiB of weights (e.g. LoRA factors) the plain call wins.
_PACK_MIN_BYTES = 256 * 1024


def _packable(module: nn.Module, tied: set[int]) -> bool:
    if type(module) is PackedLinear:
        return not module.weight.is_mkldnn  # re-bound to a plain tensor since packing
    w = getattr(module, "weight", None)
    return (
        type(module) is nn.Linear
        and "forward" not in module.__dict__  # forward patched by accelerate & co.: leave alone
        and isinstance(w, torch.Tensor)
        and w.dtype == torch.bfloat16
        and w.device.type == "cpu"
        and w.dim() == 2
        and w.numel() * w.element_size() >= _PACK_MIN_BYTES
        and id(w) not in tied  # lm_head tied to the embedding: packing would duplicate it
    )


def prepare_for_decoding(model: nn.Module, *, pack_weights: bool = True) -> nn.Module:
    """One-time, idempotent preparation for inference: eval mode, no grads, and bf16 ``nn.Linear``
    weights prepacked for oneDNN (see ``PackedLinear``) wherever that leaves outputs bit-identical.

    A second call only re-checks (about a millisecond on a 1B model), so calling it before every
    use is fine; ``generate_ids`` does.
    """
    if model.training:
        model.eval()
    for p in model.parameters():
        if p.requires_grad:
            p.requires_grad_(False)
    if pack_weights and _mkldnn_bf16_ok():
        embeddings = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
        tied = {id(w) for w in embeddings}
        with torch.no_grad():
            for module in model.modules():
                if _packable(module, tied):
                    _pack(module)
    return model


# -------------------------------------------------------------------------------------------------
# Forward steps. A runner owns one sequence's KV cache; step(ids) appends ids to the sequence and
# returns the float32 logits of its last position.


def _fast_path_blocker(model: nn.Module) -> str | None:
    """Why LlamaRunner cannot run this model, or None if it can."""
    if type(model).__name__ != "LlamaForCausalLM":
        return f"{type(model).__name__} is not LlamaForCausalLM"
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa":
        return f"attention implementation {impl!r} (LlamaRunner mirrors sdpa)"
    if getattr(model.config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    if _hf_sdpa is None:
        return "transformers too old (no integrations.sdpa_attention)"
    linears = [model.lm_head]
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        linears += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
    if any(type(lin) not in (nn.Linear, PackedLinear) for lin in linears):
        return "a projection is not a plain nn.Linear (adapter or quantized layer)"
    for module in model.modules():
        # LlamaRunner calls the weights directly, so hooks (offloading, adapters) would be skipped.
        if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__:
            return f"{type(module).__name__} has forward hooks"
    return None


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # The op sequence of LlamaRMSNorm (fp32 statistics, cast back, then scale): identical bits.
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _plain_activation(act: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    # nn.SiLU (transformers 4.x) and transformers' SiLUActivation (5.x) are both F.silu; calling
    # it directly skips a module __call__ per layer.
    if isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation":
        return F.silu
    return act


class _Layer(NamedTuple):
    """What one decoder layer needs per token, gathered once (no module attribute walks)."""

    attn: nn.Module  # only handed to transformers' sdpa wrapper
    ln1: torch.Tensor
    eps1: float
    ln2: torch.Tensor
    eps2: float
    act: Callable[[torch.Tensor], torch.Tensor]
    q: tuple[torch.Tensor, torch.Tensor | None]  # (weight, bias) of each projection
    k: tuple[torch.Tensor, torch.Tensor | None]
    v: tuple[torch.Tensor, torch.Tensor | None]
    o: tuple[torch.Tensor, torch.Tensor | None]
    gate: tuple[torch.Tensor, torch.Tensor | None]
    up: tuple[torch.Tensor, torch.Tensor | None]
    down: tuple[torch.Tensor, torch.Tensor | None]
    k_cache: torch.Tensor  # [1, kv heads, max_len, head dim]
    v_cache: torch.Tensor


class LlamaRunner:
    """Flat LlamaForCausalLM forward over a preallocated KV cache.

    Op for op the math of transformers' Llama with sdpa attention, so logits are bit-identical;
    what it drops is per-token framework work: generate's bookkeeping, mask construction,
    DynamicCache concatenation, module __call__ dispatch, logits for positions nobody samples.
    """

    def __init__(self, model: nn.Module, max_len: int) -> None:
        cfg, inner = model.config, model.model
        attn = inner.layers[0].self_attn
        self.hd, self.scale = attn.head_dim, attn.scaling
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.embed = inner.embed_tokens.weight
        self.max_len = max_len
        self.pos = 0

        def wb(lin: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
            return lin.weight, lin.bias

        shape = (1, self.nkv, max_len, self.hd)
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            self.layers.append(
                _Layer(
                    a, ln1.weight, ln1.variance_epsilon, ln2.weight, ln2.variance_epsilon,
                    _plain_activation(m.act_fn),
                    wb(a.q_proj), wb(a.k_proj), wb(a.v_proj), wb(a.o_proj),
                    wb(m.gate_proj), wb(m.up_proj), wb(m.down_proj),
                    torch.empty(shape, dtype=self.embed.dtype, device=self.embed.device),
                    torch.empty(shape, dtype=self.embed.dtype, device=self.embed.device),
                )
            )  # fmt: skip
        self.norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.lm_head = wb(model.lm_head)
        self.rotary = inner.rotary_emb  # the model's own: exact cos/sin for any rope scaling type

    def step(self, ids: list[int]) -> torch.Tensor:
        T, p0, nh, nkv, hd = len(ids), self.pos, self.nh, self.nkv, self.hd
        end = p0 + T
        if end > self.max_len:
            raise ValueError(f"sequence length {end} exceeds the KV cache ({self.max_len})")
        dev = self.embed.device
        x = F.embedding(torch.tensor([ids], device=dev), self.embed)
        cos, sin = self.rotary(x, torch.arange(p0, end, device=dev).unsqueeze(0))  # [1, T, hd]
        # rotate_half(x) * sin == roll(x, hd/2) * [-sin_lo, sin_hi] bit for bit (negation commutes
        # with rounding): one roll per q/k instead of slice, slice, neg, cat.
        half = hd // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), -1).unsqueeze(1)
        cos = cos.unsqueeze(1)  # [1, 1, T, hd]: broadcast over heads
        # With no mask, transformers' sdpa wrapper uses the causal flag when T > 1 (a prefill from
        # position 0); a later multi-token chunk needs a causal mask aligned to the end of the keys.
        mask = None
        if T > 1 and p0 > 0:
            mask = (
                torch.arange(end, device=dev)[None, :] <= torch.arange(p0, end, device=dev)[:, None]
            )
            mask = mask[None, None]  # [1, 1, T, end]
        for L in self.layers:
            h = _rms_norm(x, L.ln1, L.eps1)
            q = _linear(h, *L.q).view(1, T, nh, hd).transpose(1, 2)
            k = _linear(h, *L.k).view(1, T, nkv, hd).transpose(1, 2)
            v = _linear(h, *L.v).view(1, T, nkv, hd).transpose(1, 2)
            q = q * cos + torch.roll(q, half, -1) * sin
            k = k * cos + torch.roll(k, half, -1) * sin
            L.k_cache.narrow(2, p0, T).copy_(k)
            L.v_cache.narrow(2, p0, T).copy_(v)
            keys, values = L.k_cache.narrow(2, 0, end), L.v_cache.narrow(2, 0, end)
            # transformers' own sdpa wrapper: it picks enable_gqa or repeat_kv per version, and
            # the two are not bit-identical on every torch (they differ on 2.8).
            o, _ = _hf_sdpa(L.attn, q, keys, values, mask, scaling=self.scale)
            x = x + _linear(o.reshape(1, T, nh * hd), *L.o)
            h = _rms_norm(x, L.ln2, L.eps2)
            x = x + _linear(L.act(_linear(h, *L.gate)) * _linear(h, *L.up), *L.down)
        self.pos = end
        # Norm is per position, so normalising only the last one is exact.
        h = _rms_norm(x[:, -1:], *self.norm)
        return _linear(h, *self.lm_head)[0, -1].float()


class HFRunner:
    """Generic path: the model's own forward and cache type, logits for the last position only."""

    def __init__(self, model: nn.Module, max_len: int) -> None:
        self.model = model
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed past_key_values to cache (the old name still works, deprecated).
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.extra: dict[str, Any] = {"use_cache": True}
        if "logits_to_keep" in params:
            self.extra["logits_to_keep"] = 1
        elif "num_logits_to_keep" in params:
            self.extra["num_logits_to_keep"] = 1
        self.pass_positions = "position_ids" in params
        self.cache: Any = None
        self.pos = 0
        self.device = next(model.parameters()).device

    def step(self, ids: list[int]) -> torch.Tensor:
        T = len(ids)
        kwargs = dict(self.extra)
        if self.cache is not None:
            kwargs[self.cache_kw] = self.cache
        if self.pass_positions:
            kwargs["position_ids"] = torch.arange(self.pos, self.pos + T, device=self.device)[None]
        out = self.model(input_ids=torch.tensor([ids], device=self.device), **kwargs)
        # The first call creates the model's own cache (DynamicCache, hybrid caches, ...).
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else getattr(out, "past_key_values", None)
        self.pos += T
        return out.logits[0, -1].float()


def make_runner(model: nn.Module, max_len: int) -> LlamaRunner | HFRunner:
    """Per-sequence forward state for up to max_len tokens: LlamaRunner where it applies."""
    if _fast_path_blocker(model) is None:
        return LlamaRunner(model, max_len)
    return HFRunner(model, max_len)


# -------------------------------------------------------------------------------------------------
# The generation loop


@torch.inference_mode()  # on a generator, torch enters the mode around each resume only
def generate_ids(
    model: nn.Module,
    prompt_ids: list[int],
    config: Any,
    eos_token_ids: set[int],
    *,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time; stop at an EOS token (not yielded) or max_new_tokens."""
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    if int(_opt(config, "num_beams")) != 1:
        raise ValueError("generate_ids decodes one sequence: num_beams must be 1")
    max_new = int(_opt(config, "max_new_tokens"))
    if max_new <= 0:
        return
    eos = set(eos_token_ids or ())
    prepare_for_decoding(model)
    runner = make_runner(model, len(prompt_ids) + max_new)
    # Prompt + generated ids for the repetition penalty, preallocated: no tensor rebuilt per token.
    history = torch.empty(len(prompt_ids) + max_new, dtype=torch.long)
    history[: len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
    n = len(prompt_ids)
    logits = runner.step(list(prompt_ids))
    for i in range(max_new):
        token = sample_next(logits, history[:n], config, generator)
        if token in eos:
            return
        yield token
        if i + 1 == max_new:
            return  # no forward pass for a token nobody will sample
        history[n] = token
        n += 1
        logits = runner.step([token])
