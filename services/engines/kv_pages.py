"""A replica's paged KV cache, shared by its requests, and the batched forward over it (DESIGN.md section 7).

The pool preallocates `kv_tokens` positions per layer as pages of `page_size` positions (keys and values
`[layers, pages, page_size, kv_heads, head_dim]`). A request reserves the pages of its whole capacity (prompt +
new tokens) when it starts, so a running request never runs out, and one that cannot fit is refused at once with
RESOURCE_EXHAUSTED. `forward` runs rows of any requests through the model in one call (one request's prefill
chunk, or the next token of many requests whose caches hold different lengths): each row writes its new positions
into its own pages and attends only to its own positions, through a `[rows, 1, new, keys]` mask, so what a row
computes does not depend on the rows beside it (up to the float rounding of a wider matmul). `step` is `forward`
for one new position per row (a decode step), replayed from a trace per batch size (`services.engines.replay`).

    pool = KVPool(model.config, tokens=65536, page_size=16, device="cpu", dtype=torch.float32, stage="thinker")
    kv = pool.reserve(prompt_len + max_new_tokens)        # KVSlot
    out = pool.forward(model, [kv], embeds[None], position_ids)   # prefill (or a chunk of it)
    hidden = pool.step(model, [kv_a, kv_b], next_embeds, next_positions)  # one decode step of two requests
    kv.close()                                             # its pages go back to the pool

A finished request's pages may instead be parked under its session's cache key (`park`), for that session's next
request to take back (`unpark`, `grow`): parked pages are the first to go when a reservation needs room, least
recently parked first (`services.engines.prefix`), so they never make the pool refuse a request.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from services.engines.replay import Replays
from services.errors import InvalidInput, ResourceExhausted

# What becomes of a request's KV when it ends, if it has a cache key (`ThinkerPrompt.keep`, `TalkerPrompt.keep`):
KEEP_SESSION = "session"  # kept for the session's next request
KEEP_TURN = "turn"  # kept for this turn's next request (its input still streams in), the first to be evicted
KEEP_NONE = "none"  # freed


@dataclass(eq=False)
class KVSlot:
    """One request's pages: `length` of `capacity` positions filled. Closing returns the pages; a step already
    running with them may still write there, which is harmless: the pages' next owner writes before it reads, on
    the same worker thread, after that step."""

    pool: KVPool
    pages: list[int]
    capacity: int
    length: int = 0
    closed: bool = field(default=False)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.release(self.pages)


@dataclass(eq=False)
class KVSession:
    """A decoding request's state on its replica (the Thinker's and the Talker's sessions extend it)."""

    kv: KVSlot
    rope_delta: int  # TM-RoPE: rotary position = text position + rope_delta for every token after the prompt

    @property
    def length(self) -> int:  # positions filled in the KV cache
        return self.kv.length

    @property
    def capacity(self) -> int:
        return self.kv.capacity

    @property
    def closed(self) -> bool:
        return self.kv.closed

    def close(self) -> None:
        self.kv.close()


def prefill_whole(job, prefill_step):
    """Run every chunk of a prefill job (`job.session`, `prefill_step(job)` -> None until the last chunk's result):
    its session and that result. A failure closes the session, so its pages go back."""
    try:
        while (result := prefill_step(job)) is None:
            pass
    except BaseException:
        job.session.close()
        raise
    return job.session, result


def padded_chunks(chunks: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, list[int]]:
    """Prompt chunks of several requests, each (embeds [n_i, H], position_ids [4, n_i]), as one `KVPool.forward`'s
    input: embeds [B, n, H] and position_ids [4, B, n] padded to the longest chunk, and the `lengths`."""
    lengths = [len(e) for e, _ in chunks]
    embeds = chunks[0][0].new_zeros(len(chunks), max(lengths), chunks[0][0].shape[1])
    positions = chunks[0][1].new_zeros(4, len(chunks), max(lengths))
    for row, (e, p) in enumerate(chunks):
        embeds[row, :len(e)] = e
        positions[:, row] = p[:, -1:]  # the padding's positions: any
        positions[:, row, :len(e)] = p
    return embeds, positions, lengths


def prefill_chunks(jobs: Sequence, prefill_step, prefill_padded, alone, closed: str) -> list:
    """The next chunk of each prefill job: `prefill_step(job)` for one that runs `alone(job)`, the others' in one
    `prefill_padded(jobs)` (a single one's by `prefill_step`). A closed session's result is `InvalidInput(closed)`,
    for its caller to raise: one request's error never fails the others'."""
    out: list = [None] * len(jobs)
    together = []
    for i, job in enumerate(jobs):
        if job.session.closed:
            out[i] = InvalidInput(closed)
        elif alone(job):
            out[i] = prefill_step(job)
        else:
            together.append(i)
    if len(together) == 1:
        out[together[0]] = prefill_step(jobs[together[0]])
    elif together:
        for i, result in zip(together, prefill_padded([jobs[i] for i in together]), strict=True):
            out[i] = result
    return out


class KVPool:
    def __init__(self, config, tokens: int, page_size: int, device: str | torch.device, dtype: torch.dtype,
                 stage: str, replay: bool = True):
        """`config`: a decoder's text config (layers, KV heads, head size); `replay`: False runs every `step`
        eagerly (the tests compare the two)."""
        if tokens < 1 or page_size < 1:
            raise ValueError(f"kv_tokens and page_size must be positive, got {tokens} and {page_size}")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        pages = -(-tokens // page_size)
        # One more page than the requests': where the padding of a batch of prompt chunks writes (`forward`).
        # Page-major, then position: a row's pages read as one [positions, kv_heads, head_dim] run, which attention
        # takes as it is (a view), where [kv_heads, positions] pages would need a transposing copy per layer per step.
        shape = (config.num_hidden_layers, pages + 1, page_size, config.num_key_value_heads, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.page_size, self.stage, self.device = page_size, stage, torch.device(device)
        self.capacity = pages * page_size
        self._scratch = pages
        self._free = list(range(pages - 1, -1, -1))  # popped from the end: low pages first
        self._lock = threading.Lock()  # reserve/release come from the event loop, steps run on the worker thread
        self._parked: OrderedDict[str, object] = OrderedDict()  # cache key -> what `park` kept, first to go first
        self._sdpa = getattr(config, "_attn_implementation", "sdpa") == "sdpa"
        self._replay = replay
        self._steps: Replays | None = None  # `step`'s traces, for the model of its first call

    @property
    def free_positions(self) -> int:
        return len(self._free) * self.page_size

    @property
    def parked_positions(self) -> int:
        with self._lock:
            return sum(len(p.slot.pages) for p in self._parked.values()) * self.page_size

    def reserve(self, positions: int) -> KVSlot:
        with self._lock:
            pages = self._take(-(-positions // self.page_size), positions)
        return KVSlot(self, pages, capacity=positions)

    def grow(self, slot: KVSlot, positions: int) -> None:
        """Make `slot` hold `positions` positions (a taken-back prefix, for its new request's prompt and answer)."""
        with self._lock:
            slot.pages += self._take(max(0, -(-positions // self.page_size) - len(slot.pages)), positions)
        slot.capacity = positions

    def _take(self, needed: int, positions: int) -> list[int]:
        """`needed` free pages, evicting parked prefixes for them if need be (the lock held)."""
        if needed * self.page_size > self.capacity:
            raise ResourceExhausted(
                f"{self.stage}: a request of {positions} positions (prompt + new tokens) exceeds this replica's "
                f"KV cache of {self.capacity} positions; lower max_new_tokens or raise the stage's kv_tokens")
        while needed > len(self._free) and self._parked:
            _, evicted = self._parked.popitem(last=False)
            evicted.slot.closed = True
            self._free.extend(reversed(evicted.slot.pages))
        if needed > len(self._free):
            raise ResourceExhausted(
                f"{self.stage}: the KV cache is full ({self.capacity - self.free_positions} of {self.capacity} "
                f"positions held by requests in flight); retry shortly, or add replicas")
        return [self._free.pop() for _ in range(needed)]

    def release(self, pages: list[int]) -> None:
        with self._lock:
            self._free.extend(reversed(pages))

    def park(self, key: str, parked, keep: str) -> None:
        """What a request leaves for the next with its key (`prefix.ParkedPrefix`, `talker.ParkedTalker`; its `slot`
        filled up to its length), as `keep` says: kept for the next `unpark(key)` (KEEP_TURN: the first to be
        evicted; KEEP_SESSION: the last, until more are parked), its pages past its length going back now; or freed
        (KEEP_NONE, or no key). What was parked before under `key` is dropped."""
        slot = parked.slot
        if not key or keep == KEEP_NONE:
            slot.close()
            return
        kept = -(-slot.length // self.page_size)
        with self._lock:
            self._free.extend(reversed(slot.pages[kept:]))
            slot.pages, slot.capacity = slot.pages[:kept], slot.length
            old = self._parked.pop(key, None)
            self._parked[key] = parked
            if keep == KEEP_TURN:
                self._parked.move_to_end(key, last=False)
        if old is not None:
            old.slot.close()

    def unpark(self, key: str):
        """The prefix parked under `key`, now the caller's (close its slot, or `grow` it), or None."""
        with self._lock:
            return self._parked.pop(key, None)

    def forward(self, model: torch.nn.Module, slots: Sequence[KVSlot], embeds: Tensor, position_ids: Tensor,
                lengths: Sequence[int] | None = None, **kwargs):
        """embeds [B, n, H]: each slot's next n positions, after its `length` filled ones; position_ids [4, B, n].
        With `lengths`, row b's first lengths[b] positions are its own and the rest padding (prompt chunks of
        different lengths in one forward): the padding's keys go to a scratch page, and its outputs mean nothing.
        Returns the model's output; every slot's length grows by n (lengths[b]). The caller checks capacity."""
        cache, mask = self._layout(slots, embeds, lengths)
        out = model(inputs_embeds=embeds, position_ids=position_ids, attention_mask=mask, past_key_values=cache,
                    use_cache=True, **kwargs)
        self._grow(slots, lengths or [embeds.shape[1]] * len(slots))
        return out

    def step(self, model: torch.nn.Module, slots: Sequence[KVSlot], embeds: Tensor, position_ids: Tensor) -> Tensor:
        """`forward` of one new position per slot (embeds [B, 1, H], a decode step): the model's last hidden state
        [B, 1, H]. A pool serves one model: the first call's, whose steps are replayed from a trace per batch size
        (the same ops on the same tensors, so the same bits, without the GIL between them: at the tiny checkpoint's
        widths a Talker step of 6 rows took 1.95 ms eagerly and 0.95 ms replayed alone, 3.2 and 1.4 ms beside a
        thread stepping Code2Wav). A trace holds no length: the tables, the mask and the run of pages are its inputs,
        so one trace serves every cache length."""
        cache, mask = self._layout(slots, embeds, None)
        inputs = (embeds, position_ids, mask, cache.table, cache.write_pages, cache.write_offsets)
        run = () if cache.run is None else (cache.run,)
        hidden = self._replays(model)((len(slots), bool(run)), *inputs, *run)
        self._grow(slots, [1] * len(slots))
        return hidden

    def traced(self) -> set[tuple[int, bool]]:
        """The steps traced so far: (rows, whether one request's pages are read in place)."""
        return set() if self._steps is None else self._steps.traced()

    def warm(self, model: torch.nn.Module, max_batch: int = 1) -> None:
        """Trace `step` for each batch size up to `max_batch` (and one request's pages read in place) now, not at
        the first step of that size. The steps write to the scratch page only."""
        replays = self._replays(model)
        page = torch.tensor([self._scratch], device=self.device)
        for rows in range(1, max_batch + 1):
            embeds = self.keys.new_zeros(rows, 1, model.config.hidden_size)
            positions = torch.zeros(4, rows, 1, dtype=torch.long, device=self.device)
            mask = torch.ones(rows, 1, 1, self.page_size, dtype=torch.bool, device=self.device)
            if not self._sdpa:
                mask = torch.zeros(mask.shape, dtype=embeds.dtype, device=self.device)
            table = page.expand(rows, 1).contiguous()
            inputs = (embeds, positions, mask, table, table, torch.zeros_like(table))
            replays((rows, False), *inputs)
            if rows == 1:
                replays((1, True), *inputs, torch.tensor([self._scratch, self._scratch + 1]))

    def _replays(self, model: torch.nn.Module) -> Replays:
        if self._steps is None:
            self._steps = Replays(f"{self.stage} steps", _step_function(self, model), self._replay)
        return self._steps

    def _layout(self, slots: Sequence[KVSlot], embeds: Tensor, lengths: Sequence[int] | None):
        """Where each row's new keys go and which it reads (`_StepCache`), and the attention mask."""
        n = embeds.shape[1]
        starts = torch.tensor([s.length for s in slots], device=self.device)
        positions = starts[:, None] + torch.arange(n, device=self.device)  # [B, n]
        n_pages = -(-(max(s.length for s in slots) + n) // self.page_size)
        # Each row's first n_pages pages; a row with fewer is padded with page 0. Keys past a row's length are
        # masked out, whichever page they come from.
        table = torch.tensor([(slot.pages + [0] * n_pages)[:n_pages] for slot in slots], device=self.device)
        mask = torch.arange(n_pages * self.page_size, device=self.device) <= positions[:, None, :, None]
        if not self._sdpa:  # eager attention adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=embeds.dtype, device=self.device).masked_fill(
                ~mask, torch.finfo(embeds.dtype).min)
        write_pages, write_offsets = table.gather(1, positions // self.page_size), positions % self.page_size
        if lengths is not None:  # a padded position's key comes after its row's: no row attends to it
            padding = torch.arange(n, device=self.device) >= torch.tensor(lengths, device=self.device)[:, None]
            write_pages = write_pages.masked_fill(padding, self._scratch)
        # One request whose pages are consecutive (a fresh pool hands out runs) reads them in place: no gather.
        run = None
        if len(slots) == 1 and _consecutive(slots[0].pages[:n_pages]):
            first = slots[0].pages[0]
            run = torch.tensor([first, first + n_pages])  # on the CPU: its bounds are read back, per layer
        return _StepCache(self, table, write_pages, write_offsets, run), mask

    @staticmethod
    def _grow(slots: Sequence[KVSlot], grown: Sequence[int]) -> None:
        for slot, n in zip(slots, grown, strict=True):
            slot.length += n


def _step_function(pool: KVPool, model: torch.nn.Module):
    """`KVPool.step`'s model call, with the step's layout as tensors (what a trace takes as inputs)."""
    # A named function, not a lambda: torch.jit.trace names its trace after what it traces.
    def decode_step(embeds, position_ids, mask, table, write_pages, write_offsets, run=None):
        cache = _StepCache(pool, table, write_pages, write_offsets, run)
        return model(inputs_embeds=embeds, position_ids=position_ids, attention_mask=mask, past_key_values=cache,
                     use_cache=True).last_hidden_state

    return decode_step


class _StepCache:
    """What the attention layers call during one `forward`: write the rows' new keys and values into their pages,
    and return each row's pages as one `[B, kv_heads, pages * page_size, head_dim]` run."""

    is_compileable = False

    def __init__(self, pool: KVPool, table: Tensor, write_pages: Tensor, write_offsets: Tensor, run: Tensor | None):
        """`run`: [first, end) pages, where one request's pages lie in one run (read in place), else None."""
        self.pool, self.table, self.run = pool, table, run
        self.write_pages, self.write_offsets = write_pages, write_offsets  # [B, n]

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *_args, **_kwargs) -> tuple[Tensor, Tensor]:
        out = []
        for store, new in ((self.pool.keys[layer_idx], key), (self.pool.values[layer_idx], value)):
            store[self.write_pages, self.write_offsets] = new.transpose(1, 2).to(store.dtype)  # [B, n, h, d]
            # [B, pages, page_size, h, d]: the run's view, else a gather (one copy)
            rows = _pages_in_run(store, self.run)[None] if self.run is not None else store[self.table]
            rows = rows.flatten(1, 2).transpose(1, 2)  # [B, h, pages * page_size, d], a view
            # A prompt chunk's many queries read each key: laid out for them (one copy), a 64-token chunk is no
            # slower than before, where the strided view was about 5% slower.
            out.append(rows.contiguous() if key.shape[2] > 1 else rows)
        return out[0], out[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always given; nothing should ask


@torch.jit.script
def _pages_in_run(store: Tensor, run: Tensor) -> Tensor:
    """`store[run[0]:run[1]]`, a view. Scripted, so that a trace of a step that calls it (`KVPool.step`) slices
    the run of each call it replays, not the run of the call it was traced from (a traced slice's bounds are
    constants)."""
    return store[int(run[0]):int(run[1])]


def _consecutive(pages: list[int]) -> bool:
    return pages == list(range(pages[0], pages[0] + len(pages)))
