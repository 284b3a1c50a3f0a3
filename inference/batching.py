"""Continuous batching: many conversations generate at once, sharing each decode step.

``Scheduler`` is what the inference worker drives. On this CPU decode is bound by memory
bandwidth: a step at batch 1 streams every weight matrix to produce one token. So all running
sequences go through one forward per step, as rows of the same GEMMs, and the weights are
streamed once for the whole batch; that is where the aggregate throughput comes from.

* Each sequence owns a slot of a preallocated KV cache ``[layers, max_batch, kv_heads,
  capacity, head_dim]`` (capacity grows with the longest request) and its own position. The
  decode rows attend in one masked sdpa call per layer over slots [0, S), each row masked to
  its own length: measured faster than one call per sequence (bench/batching.py: at 8
  sequences 7.8x round-robin's tokens/s against 5.0x; sdpa's per-call cost dominates).
* A request ``add``-ed between two steps joins at the next ``step``: its prompt is evaluated in
  that step, as extra rows of the same forward, and its first token is sampled in that same
  step. Prompts are fed ``prefill_chunk`` tokens per step at most (all joiners together, first
  come first served), so a huge prompt delays the running sequences' next token by one chunk's
  worth of compute per step rather than by the whole prompt.
* Each sequence samples with its own ``GenerationConfig`` through ``decoding.sample_next``
  (repetition penalty over its own history, its own seed, ``max_new_tokens``, the chatbot's
  EOS ids).

Numerics: a step with a single row to decode and no prompt to evaluate is op for op
``decoding.LlamaRunner``'s decode step, and a prompt evaluated in one piece is op for op its
prefill, so a sequence decoding alone gets the tokens of ``Chatbot.generate_token_ids``. With
several rows, the bf16 GEMMs run at M > 1, and oneDNN's GEMM rounds a few elements per row
differently from its M = 1 GEMV (rows never influence one another: any M >= 2 gives the same
row bits), and the batched attention sums a padded, masked row in another order; so a greedy
sequence can take another token at a near-tie. In fp32 the differences are far smaller than
any gap between candidate tokens seen in the tests.

Models the flat forward does not cover (not a Llama with sdpa, IPEX-optimised, hooks or
adapters) fall back to round-robin over per-sequence ``generate_token_ids`` streams: correct,
but sequences then do not share decode steps.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from inference.chatbot import Chatbot
from inference.config import GenerationConfig
from inference.decoding import (
    LlamaRunner,
    _fast_path_blocker,
    _hf_sdpa,
    _linear,
    _opt,
    _rms_norm,
    prepare_for_decoding,
    sample_next,
)

# KV capacity grows in steps of this many positions, so a new request rarely reallocates.
_CAPACITY_STEP = 256


@dataclass
class _Sequence:
    """One conversation's decoding state."""

    key: Hashable
    slot: int
    config: GenerationConfig
    prompt: list[int]
    max_new: int
    history: torch.Tensor  # prompt + generated ids, preallocated, for the repetition penalty
    generator: torch.Generator | None
    prefilled: int = 0  # prompt tokens already in the KV cache
    generated: int = 0
    last: int | None = None  # the last sampled token, fed at the next step
    eos: set[int] = field(default_factory=set)

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt)

    @property
    def position(self) -> int:
        """Where the last sampled token goes: the prompt and all but that token are cached."""
        return self.prefilled + self.generated - 1


class BatchedLlama:
    """The flat Llama forward of ``decoding.LlamaRunner``, over a batch of sequences of
    different lengths, each in its own slot of a shared KV cache.

    One call evaluates any mix of decode rows (one token per running sequence) and prompt
    chunks (several tokens of a joining sequence): every projection and MLP matrix is applied
    once to all rows; only attention and the cache writes are per sequence.
    """

    def __init__(self, model: torch.nn.Module, max_batch: int, attention: str = "auto") -> None:
        # The runner's weight table (decoding._Layer) and rotary module; its own 1-position
        # caches go unused.
        runner = LlamaRunner(model, 1)
        self.layers = runner.layers
        self.embed, self.norm, self.lm_head = runner.embed, runner.norm, runner.lm_head
        self.rotary = runner.rotary
        self.nh, self.nkv, self.hd, self.scale = runner.nh, runner.nkv, runner.hd, runner.scale
        self.max_batch = max_batch
        self.attention = attention
        self.k_cache = self.v_cache = torch.empty(0)
        self.capacity = 0

    def cache_shape(self, capacity: int) -> tuple[int, ...]:
        return (len(self.layers), self.max_batch, self.nkv, capacity, self.hd)

    def adopt_cache(self, other: BatchedLlama) -> None:
        """Take over another engine's cache if it fits this model (geometry, dtype, device)."""
        k = other.k_cache
        if (
            other.capacity
            and k.shape == self.cache_shape(other.capacity)
            and (k.dtype, k.device) == (self.embed.dtype, self.embed.device)
        ):
            self.k_cache, self.v_cache, self.capacity = other.k_cache, other.v_cache, other.capacity

    def reserve(self, length: int) -> None:
        """Make every slot hold ``length`` positions, keeping what the cache holds."""
        if length <= self.capacity:
            return
        capacity = max(length, 2 * self.capacity)
        capacity = -(-capacity // _CAPACITY_STEP) * _CAPACITY_STEP
        shape = self.cache_shape(capacity)
        # Zeros, not empty: batched attention multiplies masked positions by a zero weight,
        # and 0 * NaN from uninitialised memory would poison the row.
        k = torch.zeros(shape, dtype=self.embed.dtype, device=self.embed.device)
        v = torch.zeros(shape, dtype=self.embed.dtype, device=self.embed.device)
        if self.capacity:
            k[..., : self.capacity, :] = self.k_cache
            v[..., : self.capacity, :] = self.v_cache
        self.k_cache, self.v_cache, self.capacity = k, v, capacity

    def forward(
        self,
        decode: list[tuple[int, int, int]],
        chunks: list[tuple[int, int, list[int], bool]],
    ) -> torch.Tensor:
        """Logits (float32) for every decode row, then for every chunk that asks for them.

        decode: ``(slot, position, token)`` for sequences generating their next token.
        chunks: ``(slot, start, prompt_ids, logits)`` for prompt pieces; ``logits`` asks for
        the logits of its last position (the prompt's end).
        """
        dev, nh, nkv, hd = self.embed.device, self.nh, self.nkv, self.hd
        nd = len(decode)
        ids = [token for _, _, token in decode]
        positions = [pos for _, pos, _ in decode]
        for _, start, piece, _ in chunks:
            ids += piece
            positions += range(start, start + len(piece))
        n = len(ids)
        x = F.embedding(torch.tensor([ids], device=dev), self.embed)  # [1, N, hidden]
        cos, sin = self.rotary(x, torch.tensor([positions], device=dev))  # [1, N, hd]
        half = hd // 2
        # As in LlamaRunner: rotate_half(x) * sin == roll(x, hd/2) * [-sin_lo, sin_hi].
        sin = torch.cat((-sin[..., :half], sin[..., half:]), -1).unsqueeze(2)
        cos = cos.unsqueeze(2)  # [1, N, 1, hd]: broadcast over heads

        slots = [slot for slot, _, _ in decode]
        lengths = [pos + 1 for _, pos, _ in decode]
        batched = self.attention == "batched" or (self.attention == "auto" and nd > 1)
        if nd:
            slot_t = torch.tensor(slots, device=dev)
            pos_t = torch.tensor(positions[:nd], device=dev)
        if batched and nd:
            # One sdpa call over slots [0, S): queries of slots without a decode row are zero
            # and see position 0 only (finite either way); their output is dropped.
            width = max(slots) + 1
            span = max(lengths)
            dense = slots == list(range(width))
            seen = torch.tensor([0] * width, device=dev)
            seen[slot_t] = torch.tensor(lengths, device=dev) - 1
            mask = torch.arange(span, device=dev)[None, :] <= seen[:, None]
            mask = mask[:, None, None, :]  # [S, 1, 1, span], shared by all heads
            rep = nh // nkv
        segments = []  # (row offset, slot, start, length) of each chunk
        row = nd
        for slot, start, piece, _ in chunks:
            segments.append((row, slot, start, len(piece)))
            row += len(piece)

        for i, L in enumerate(self.layers):
            h = _rms_norm(x, L.ln1, L.eps1)
            q = _linear(h, *L.q).view(1, n, nh, hd)
            k = _linear(h, *L.k).view(1, n, nkv, hd)
            v = _linear(h, *L.v).view(1, n, nkv, hd)
            q = q * cos + torch.roll(q, half, -1) * sin
            k = k * cos + torch.roll(k, half, -1) * sin
            kc, vc = self.k_cache[i], self.v_cache[i]  # [max_batch, nkv, capacity, hd]
            outs = []
            if nd:
                kc[slot_t, :, pos_t] = k[0, :nd]
                vc[slot_t, :, pos_t] = v[0, :nd]
                if batched:
                    # GQA as transformers does for one query token: the query heads sharing a
                    # KV head become that head's query rows, so K/V are not repeated.
                    if dense:
                        qd = q[0, :nd]
                    else:
                        qd = q.new_zeros(width, nh, hd)
                        qd[slot_t] = q[0, :nd]
                    o = F.scaled_dot_product_attention(
                        qd.reshape(width, nkv, rep, hd),
                        kc[:width, :, :span],
                        vc[:width, :, :span],
                        attn_mask=mask,
                        scale=self.scale,
                    ).reshape(width, nh * hd)
                    outs.append(o if dense else o[slot_t])
                else:
                    for b, (slot, length) in enumerate(zip(slots, lengths, strict=True)):
                        o, _ = _hf_sdpa(
                            L.attn,
                            q[:, b : b + 1].transpose(1, 2),
                            kc[slot : slot + 1, :, :length],
                            vc[slot : slot + 1, :, :length],
                            None,
                            scaling=self.scale,
                        )
                        outs.append(o.reshape(1, nh * hd))
            for r0, slot, start, t in segments:
                end = start + t
                kc[slot, :, start:end] = k[0, r0 : r0 + t].transpose(0, 1)
                vc[slot, :, start:end] = v[0, r0 : r0 + t].transpose(0, 1)
                mask_c = None  # from position 0, the sdpa wrapper uses the causal flag
                if t > 1 and start > 0:
                    keys = torch.arange(end, device=dev)[None, :]
                    mask_c = (keys <= torch.arange(start, end, device=dev)[:, None])[None, None]
                o, _ = _hf_sdpa(
                    L.attn,
                    q[:, r0 : r0 + t].transpose(1, 2),
                    kc[slot : slot + 1, :, :end],
                    vc[slot : slot + 1, :, :end],
                    mask_c,
                    scaling=self.scale,
                )
                outs.append(o.reshape(t, nh * hd))
            o = outs[0] if len(outs) == 1 else torch.cat(outs)
            x = x + _linear(o.unsqueeze(0), *L.o)
            h = _rms_norm(x, L.ln2, L.eps2)
            x = x + _linear(L.act(_linear(h, *L.gate)) * _linear(h, *L.up), *L.down)

        # Norm and lm_head for the rows somebody samples from.
        rows = list(range(nd))
        rows += [r0 + t - 1 for (r0, _, _, t), c in zip(segments, chunks, strict=True) if c[3]]
        last = x if rows == list(range(n)) else x[:, torch.tensor(rows, device=dev)]
        h = _rms_norm(last, *self.norm)
        return _linear(h, *self.lm_head)[0].float()


class Scheduler:
    """Runs up to ``max_batch`` sequences at once; the inference worker calls ``add``,
    ``step`` and ``cancel`` between reads of the bus.

    prefill_chunk: prompt tokens evaluated per step, over all joining sequences. A prompt of
    up to this many tokens gets its first token in the step after ``add``; a longer one in
    ``ceil(len / prefill_chunk)`` steps. Larger chunks mean fewer steps to a joiner's first
    token; smaller ones a shorter pause for the sequences already decoding.
    attention: how decode rows attend; "batched" is one masked sdpa call per layer for all
    of them, "per-sequence" one call per sequence (exactly LlamaRunner's), "auto" batched
    from two decode rows on.
    batched: False forces the round-robin fallback: every sequence decodes alone, so its
    tokens equal ``Chatbot.generate_token_ids`` whatever the load, at a fraction of the
    aggregate throughput.
    """

    def __init__(
        self,
        chatbot: Chatbot,
        max_batch: int = 8,
        *,
        prefill_chunk: int = 512,
        attention: str = "auto",
        batched: bool = True,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        if attention not in ("auto", "batched", "per-sequence"):
            raise ValueError(f"attention must be auto, batched or per-sequence, got {attention!r}")
        self.chatbot = chatbot
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self._attention = attention
        self._batching = batched
        self._engine: BatchedLlama | None = None
        self.fallback_reason: str | None = None
        self._sequences: dict[Hashable, _Sequence] = {}  # the batched path
        self._streams: dict[Hashable, Iterator[int]] = {}  # the round-robin fallback
        self._ended: list[Hashable] = []  # added with nothing to generate
        self._refresh()

    def _refresh(self) -> None:
        """Pick the batched path or the fallback for the model as it is now.

        Done at construction and whenever the batch is empty, so a model changed in place
        between bursts (hooks added, weights re-packed) is picked up the way ``generate_ids``
        picks it up per call."""
        bot = self.chatbot
        if not self._batching:
            reason = "batching turned off (batched=False)"
        elif bot.backend == "ipex":
            reason = "IPEX-optimised model: its forward takes IPEX's own cache layout"
        else:
            prepare_for_decoding(bot.model)
            reason = _fast_path_blocker(bot.model)
        self.fallback_reason = reason
        if reason is not None:
            self._engine = None
            return
        old, self._engine = self._engine, BatchedLlama(bot.model, self.max_batch, self._attention)
        if old is not None:
            # Keep the allocated cache (reallocating costs a page-faulting memset per burst);
            # only the weight table is re-read, as generate_ids re-reads it per call.
            self._engine.adopt_cache(old)

    @property
    def batched(self) -> bool:
        """Whether sequences share decode steps (False: round-robin fallback)."""
        return self._engine is not None

    @property
    def active(self) -> int:
        return len(self._sequences) + len(self._streams) + len(self._ended)

    @property
    def room(self) -> int:
        return self.max_batch - self.active

    def add(self, key: Hashable, prompt_ids: list[int], config: GenerationConfig) -> None:
        """Queue a sequence; it joins the batch at the next ``step``."""
        if key in self._sequences or key in self._streams or key in self._ended:
            raise ValueError(f"sequence {key!r} is already running")
        if not self.room:
            raise RuntimeError(f"the batch is full ({self.max_batch} sequences)")
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        if int(_opt(config, "num_beams")) != 1:
            raise ValueError(f"num_beams must be 1 (got {config.num_beams}): no beam search")
        if not self.active:
            self._refresh()
        if self._engine is None:
            self._streams[key] = self.chatbot.generate_token_ids(prompt_ids, config)
            return
        max_new = int(_opt(config, "max_new_tokens"))
        if max_new <= 0:
            self._ended.append(key)
            return
        taken = {s.slot for s in self._sequences.values()}
        slot = min(set(range(self.max_batch)) - taken)  # lowest free: keeps slots dense
        self._engine.reserve(len(prompt_ids) + max_new)
        history = torch.empty(len(prompt_ids) + max_new, dtype=torch.long)
        history[: len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
        generator = None
        if config.do_sample and config.seed is not None:
            generator = torch.Generator(device=self.chatbot.device).manual_seed(config.seed)
        self._sequences[key] = _Sequence(
            key=key,
            slot=slot,
            config=config,
            prompt=list(prompt_ids),
            max_new=max_new,
            history=history,
            generator=generator,
            eos=set(self.chatbot.eos_token_ids or ()),
        )

    def cancel(self, key: Hashable) -> None:
        """Drop a sequence and free its slot; unknown keys are ignored."""
        self._sequences.pop(key, None)
        if key in self._ended:
            self._ended.remove(key)
        stream = self._streams.pop(key, None)
        if stream is not None and hasattr(stream, "close"):
            stream.close()

    def step(self) -> list[tuple[Hashable, int | None]]:
        """Advance every sequence by one token: ``(key, token)``, and ``(key, None)`` once a
        sequence has ended (EOS or ``max_new_tokens``) and left the batch. A sequence's last
        token and its end can come in the same step."""
        events: list[tuple[Hashable, int | None]] = [(key, None) for key in self._ended]
        self._ended.clear()
        for key, stream in list(self._streams.items()):
            token = next(stream, None)
            if token is None:
                del self._streams[key]
            events.append((key, token))
        if self._sequences:
            events += self._batched_step()
        return events

    @torch.inference_mode()
    def _batched_step(self) -> list[tuple[Hashable, int | None]]:
        assert self._engine is not None
        decode: list[tuple[int, int, int]] = []
        chunks: list[tuple[int, int, list[int], bool]] = []
        sampled: list[_Sequence] = []
        fed: list[tuple[_Sequence, int]] = []  # (sequence, prompt tokens cached after this step)
        budget = self.prefill_chunk
        # Decode rows in slot order, so the batched attention sees slots [0, S) in order.
        for seq in sorted(self._sequences.values(), key=lambda s: s.slot):
            if seq.decoding:
                assert seq.last is not None
                decode.append((seq.slot, seq.position, seq.last))
                sampled.append(seq)
        # Prompts in arrival order (dicts keep insertion order), within the step's budget.
        for seq in self._sequences.values():
            if seq.decoding or budget <= 0:
                continue
            start = seq.prefilled
            piece = seq.prompt[start : start + budget]
            budget -= len(piece)
            done = start + len(piece) == len(seq.prompt)
            chunks.append((seq.slot, start, piece, done))
            fed.append((seq, start + len(piece)))
            if done:
                sampled.append(seq)
        logits = self._engine.forward(decode, chunks)
        for seq, prefilled in fed:
            seq.prefilled = prefilled

        events: list[tuple[Hashable, int | None]] = []
        for seq, row in zip(sampled, logits, strict=True):
            n = len(seq.prompt) + seq.generated
            token = sample_next(row, seq.history[:n], seq.config, seq.generator)
            if token in seq.eos:
                events.append((seq.key, None))
                del self._sequences[seq.key]
                continue
            events.append((seq.key, token))
            seq.history[n] = token
            seq.generated += 1
            seq.last = token
            if seq.generated == seq.max_new:
                events.append((seq.key, None))
                del self._sequences[seq.key]
        return events
