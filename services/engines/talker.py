"""Talker: one codebook-0 token (c0) per 80 ms frame, from the conversation's user parts and the released text.

It composes the reference's own modules (`Qwen3OmniMoeTalkerModel`, `codec_head`, `text_projection`,
`hidden_projection`, the Thinker's token embedding) and does step by step what
`Qwen3OmniMoeForConditionalGeneration.generate` and `Qwen3OmniMoeTalkerForConditionalGeneration` do in one call.

Prefill input (`generate`, `_get_talker_user_parts`, `_get_talker_assistant_parts`):
- every position whose turn is a user turn (from its `<|im_start|>` through the `\\n` after its `<|im_end|>`, all
  turns): `text_projection(embed(id))`, or `hidden_projection(accept-layer hidden)` at audio/image/video placeholders;
- the assistant prefix, text + codec embeddings summed position by position:
  text  `<|im_start|> assistant \\n tts_pad tts_pad tts_pad tts_pad tts_bos first_token`
  codec `0           0         0  nothink think_bos think_eos speaker codec_pad codec_bos`.
TM-RoPE positions come from the reference's `get_rope_index` (`positions.TMRoPE`) over the user ids followed by 9
`tts_pad` ids, with the audio encoder's `n_window` (the reference Talker reads it from its own config, which lacks
it: DESIGN.md section 4). A session reserves KV for the prefill plus `max_new_tokens` c0s in the replica's paged cache
(`kv_pages.py`); `step_batch` runs the next step of many sessions in one forward.

Each `step` input is `sum of the previous frame's 16 codebook embeddings (MTP) + text`, the text being the next
released token, then `tts_eos` once, then `tts_pad` (`trailing_text_hidden` / `tts_pad_embed`).

Frames, for a conductor that must reproduce the reference's `talker_codes` exactly:
- frame k = (c0 of step k, 15 residual codes from `MTPEngine.predict(hidden of step k, c0)`); the reference computes
  those residuals at the start of step k+1, so a c0 becomes a frame only if the Talker runs another step after it;
- the reference generates at most `talker_max_new_tokens` c0s (prefill + steps; `prefill`'s `max_new_tokens`) and
  stops after a c0 equal to `codec_eos_id`; neither that EOS nor the c0 produced at the cap gets residual codes. So
  `frames = index of the first EOS c0`, at most `max_new_tokens - 1`; the cap's last step may be skipped;
- text: prefill takes the Thinker's first token t0; step k (k >= 1) takes t_k, then `TEXT_END`. The reference speaks
  t1 .. t_{n-2} of n generated tokens: the Thinker never embeds its last token. When that token is the Thinker's EOS
  this is simply "the text before EOS"; when the Thinker stopped at its token cap, the reference drops the last
  text token, so a conductor matching it ends the text one token early in that case.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeTalkerModel,
    Qwen3OmniMoeTalkerResizeMLP,
)

from services.checkpoint.loading import Checkpoint, load_pretrained_part, parameter_bytes
from services.config import EngineConfig, KVConfig
from services.engines.kv_pages import (
    KEEP_SESSION,
    KVPool,
    KVSession,
    KVSlot,
    padded_chunks,
    prefill_chunks,
    prefill_whole,
)
from services.engines.positions import PromptLayout, TMRoPE, step_positions
from services.engines.sampling import Sampler, SamplingParams, sample_rows
from services.errors import InvalidInput, PrefixGone, ResourceExhausted

TEXT_END = -1  # pass as the released text token to say "the Thinker's text has ended"
_ASSISTANT_PREFIX = 3  # '<|im_start|>', 'assistant', '\n'
_ASSISTANT_LEN = 9  # prefix + 4 x tts_pad + tts_bos + first token (text side)
DEFAULT_MAX_NEW_TOKENS = 4096  # c0s per request, prefill's included: the reference's talker_max_new_tokens


def default_talker_sampling(greedy: bool = False, seed: int | None = None) -> SamplingParams:
    """The reference's Talker defaults (`generate`); the repetition penalty applies when greedy too."""
    return SamplingParams(greedy=greedy, temperature=0.9, top_k=50, top_p=1.0, repetition_penalty=1.05, seed=seed)


@dataclass
class TalkerPrompt(PromptLayout):
    """The Thinker prompt's layout (`input_ids`: every turn, ending with '<|im_start|>assistant\\n'; what places its
    media), the Thinker's `mm_hidden` for its media, and the voice: `TalkerPrompt(**layout_of(thinker_prompt), ...)`."""

    # [N_mm, D_thinker] accept-layer hidden at the audio/image/video placeholders; or [N_mm - mm_from, D_thinker],
    # those from `mm_from` on (below)
    mm_hidden: Tensor | None = None
    speaker: str = "ethan"  # case-insensitive name from talker_config.speaker_id
    # The replica keeps the KV of the user parts under `cache_key` when the request ends, as `keep` says, and the
    # key's next request reuses the longest prefix of equal inputs (a session's earlier turns, or this turn's
    # input prefilled while it streamed in).
    cache_key: str = ""
    keep: str = KEEP_SESSION
    # The replica may hold the inputs at the placeholders before `mm_from`: it kept them under `cache_key` for an
    # earlier request with the same `rows_tag` (the turn's live prefill). A client over the wire then sends only
    # the rows from `mm_from` on, so each crosses once per turn, and sends them all when the replica answers
    # PrefixGone (`services.remote.RemoteTalker`).
    mm_from: int = 0
    rows_tag: str = ""


@dataclass(eq=False)
class ParkedTalker:
    """What a replica keeps of a finished request for its session's next one: the KV of its user positions, and
    their inputs (text and media embeddings), which a later prompt must repeat exactly to reuse them."""

    slot: KVSlot
    user_embeds: Tensor  # [U, H]
    rows_tag: str = ""  # the request's `TalkerPrompt.rows_tag`


@dataclass
class TalkerFrame:
    c0: int  # codebook-0 id of this frame; == codec_eos_id means the speech has ended
    hidden: Tensor  # [H] last-layer hidden of this step (MTP's input)


@dataclass(eq=False)
class TalkerSession(KVSession):
    """One request's state: its pages of the replica's KV cache, its sampler, and where its text stands."""

    sampler: Sampler  # holds the c0 history the repetition penalty looks at
    steps: int = 0  # c0 tokens generated so far
    text_ended: bool = False  # tts_eos has been fed; every later step takes tts_pad


@dataclass(eq=False)
class TalkerPrefillJob:
    """A Talker prompt being prefilled chunk by chunk (`TalkerEngine.prefill_step`)."""

    session: TalkerSession
    embeds: Tensor  # [S, H]: the user positions, then the assistant prefix (none when prefilling only)
    position_ids: Tensor  # [4, 1, S]
    user: int = 0  # how many of `embeds` are user positions

    @property
    def done(self) -> bool:
        return self.session.length >= len(self.embeds)

    def next_chunk(self, chunk: int) -> tuple[int, int]:
        """The positions [a, b) of `embeds` that the next step of `chunk` positions runs."""
        a = self.session.length
        return a, min(a + chunk, len(self.embeds))


class TalkerEngine:
    def __init__(self, omni_config, model: Qwen3OmniMoeTalkerModel, codec_head: nn.Linear,
                 text_projection: nn.Module, hidden_projection: nn.Module, text_embedding: nn.Embedding,
                 device: torch.device, kv: KVConfig = KVConfig(), replay: bool = True):
        """`replay`: False runs every step eagerly (`KVPool.step`; the tests compare the two)."""
        # Inference only; and a trace keeps the weights as constants, which must not need grad.
        self.model = model.requires_grad_(False)
        self.codec_head, self.text_embedding = codec_head, text_embedding
        self.text_projection, self.hidden_projection = text_projection, hidden_projection
        self.device = device
        self.dtype = codec_head.weight.dtype
        self.parameter_bytes = parameter_bytes(model, codec_head, text_projection, hidden_projection, text_embedding)
        self.kv = KVPool(model.config, kv.kv_tokens, kv.page_size, device, self.dtype, "talker", replay)
        self.prefill_chunk = kv.prefill_chunk

        c = omni_config
        talker = c.talker_config
        self.im_start_id, self.user_id, self.assistant_id = c.im_start_token_id, c.user_token_id, c.assistant_token_id
        self.tts_pad_id = c.tts_pad_token_id
        self.mm_token_ids = torch.tensor(
            [c.thinker_config.audio_token_id, c.thinker_config.image_token_id, c.thinker_config.video_token_id],
            device=device,
        )
        self.speakers: dict[str, int] = {k.lower(): v for k, v in talker.speaker_id.items()}
        self.codec_eos_id: int = talker.codec_eos_token_id
        vocab = talker.text_config.vocab_size
        # generate() suppresses the top 1024 codec ids (control tokens) except EOS, greedy or not.
        self.suppress_tokens = [i for i in range(vocab - 1024, vocab) if i != self.codec_eos_id]
        self.max_positions = talker.text_config.max_position_embeddings
        # The Talker's own token ids and merge size (as the reference Talker), the audio encoder's n_window.
        rope_ids = ("image_token_id", "video_token_id", "audio_token_id", "vision_start_token_id",
                    "audio_start_token_id", "position_id_per_seconds")
        rope_config = SimpleNamespace(**{n: getattr(talker, n) for n in rope_ids},
                                      audio_config=c.thinker_config.audio_config)
        self.rope = TMRoPE(rope_config, talker.spatial_merge_size)
        with torch.inference_mode():
            self._tts_bos, self._tts_eos, self._tts_pad = self._embed_text(
                [c.tts_bos_token_id, c.tts_eos_token_id, c.tts_pad_token_id]
            )
            self._codec_prefix_ids = [talker.codec_nothink_id, talker.codec_think_bos_id, talker.codec_think_eos_id]
            self._codec_tail = self.model.codec_embedding(
                torch.tensor([talker.codec_pad_id, talker.codec_bos_id], device=device)
            )

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint | str | Path, config: EngineConfig = EngineConfig(),
                        kv: KVConfig = KVConfig(), replay: bool = True) -> "TalkerEngine":
        if not isinstance(ckpt, Checkpoint):
            ckpt = Checkpoint.open(ckpt)
        talker = ckpt.config.talker_config
        device, dtype = config.device, config.torch_dtype
        model = load_pretrained_part(
            Qwen3OmniMoeTalkerModel, talker.text_config, ckpt.read("talker.model."), device, dtype
        )
        codec_head = _load_plain(
            lambda: nn.Linear(talker.text_config.hidden_size, talker.text_config.vocab_size, bias=False),
            ckpt.read("talker.codec_head."), device, dtype,
        )
        text_projection = _load_plain(
            lambda: Qwen3OmniMoeTalkerResizeMLP(talker), ckpt.read("talker.text_projection."), device, dtype
        )
        hidden_projection = _load_plain(
            lambda: Qwen3OmniMoeTalkerResizeMLP(talker), ckpt.read("talker.hidden_projection."), device, dtype
        )
        weight = ckpt.read_one("thinker.model.embed_tokens.weight")
        text_embedding = nn.Embedding.from_pretrained(weight.to(device, dtype), freeze=True)
        return cls(ckpt.config, model, codec_head, text_projection, hidden_projection, text_embedding,
                   torch.device(device), kv, replay)

    def speaker_id(self, name: str) -> int:
        sid = self.speakers.get(name.lower())
        if sid is None:
            raise InvalidInput(f"unknown speaker {name!r}; valid speakers: {', '.join(sorted(self.speakers))}")
        return sid

    @torch.inference_mode()
    def prefill(
        self, prompt: TalkerPrompt, first_token_id: int, sampling: SamplingParams,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> tuple[TalkerSession, TalkerFrame]:
        """first_token_id: the Thinker's first generated token (the Talker needs '<|im_start|>assistant\\n' + it).
        The session holds room for `max_new_tokens` c0s, this one included."""
        job = self.start(prompt, first_token_id, sampling, max_new_tokens)
        return prefill_whole(job, self.prefill_step)

    @torch.inference_mode()
    def start(
        self, prompt: TalkerPrompt, first_token_id: int | None, sampling: SamplingParams,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> TalkerPrefillJob:
        """Check the prompt, reserve its KV and build its input; `prefill_step` runs it chunk by chunk.
        `first_token_id` None: the user parts only, to keep for the prompt's cache key (a turn still streaming in)."""
        speaker = self.speaker_id(prompt.speaker)
        ids = prompt.input_ids.reshape(-1).to(self.device, torch.long)
        if len(ids) < _ASSISTANT_PREFIX or ids[-3] != self.im_start_id or ids[-2] != self.assistant_id:
            raise InvalidInput("the Talker prompt must end with '<|im_start|>assistant\\n'")
        user = self._user_mask(ids)
        n_user, assistant = int(user.sum()), None
        length = capacity = n_user
        if first_token_id is not None:
            if max_new_tokens < 1:
                raise InvalidInput(f"max_new_tokens must be >= 1, got {max_new_tokens}")
            self._check_text_token(first_token_id)
            prefix = self._embed_text(torch.cat((ids[-_ASSISTANT_PREFIX:], ids.new_tensor([first_token_id]))))
            pad = self._tts_pad.expand(4, -1)
            text = torch.cat((prefix[:3], pad, self._tts_bos[None], prefix[3:]))
            codec = torch.cat((
                torch.zeros(_ASSISTANT_PREFIX, text.shape[-1], device=self.device, dtype=self.dtype),
                self.model.codec_embedding(torch.tensor(self._codec_prefix_ids + [speaker], device=self.device)),
                self._codec_tail,
            ))
            assistant = text + codec
            length = n_user + len(assistant)
            capacity = length + max_new_tokens - 1
        if capacity > self.max_positions:
            raise ResourceExhausted(
                f"Talker prompt of {length} positions + {max_new_tokens} c0s exceeds {self.max_positions}"
            )
        talker_ids = torch.cat((ids[user], ids.new_full((_ASSISTANT_LEN,), self.tts_pad_id)))
        positions = self.rope.layout_positions(prompt, talker_ids)
        # What the replica kept for the key is this request's from here: claimed, or closed.
        parked = self.kv.unpark(prompt.cache_key) if prompt.cache_key else None
        try:
            user_embeds = self._user_embeds(ids, user, prompt, parked)
            kv = self._claim(parked, user_embeds, capacity)
        except BaseException:
            if parked is not None:
                parked.slot.close()
            raise
        embeds = user_embeds if assistant is None else torch.cat((user_embeds, assistant))  # [S, H]
        session = TalkerSession(kv=kv, rope_delta=positions.rope_delta,
                                sampler=Sampler(sampling, self.suppress_tokens, self.device))
        return TalkerPrefillJob(session, embeds, positions.position_ids[:, :, :len(embeds)].to(self.device),
                                user=n_user)

    def _claim(self, parked: ParkedTalker | None, user_embeds: Tensor, capacity: int) -> KVSlot:
        """The request's KV: what the replica kept under its key, its length the longest prefix of equal user inputs
        (so the prefill starts there), grown to `capacity`; else fresh pages."""
        if parked is not None:
            n = min(len(parked.user_embeds), len(user_embeds))
            differ = (parked.user_embeds[:n] != user_embeds[:n]).any(-1).nonzero()
            reused = int(differ[0]) if differ.numel() else n
            if reused:
                self.kv.grow(parked.slot, capacity)  # failing, `start` closes it
                parked.slot.length = reused
                return parked.slot
            parked.slot.close()
        return self.kv.reserve(capacity)

    def park(self, job: TalkerPrefillJob, prompt: TalkerPrompt) -> None:
        """Keep a finished request's user-part KV under `prompt.cache_key` for the next request (`_claim`), as
        `prompt.keep` says; else free it."""
        slot = job.session.kv
        if slot.closed or slot.length < job.user:
            slot.close()
            return
        slot.length = job.user  # the assistant part and the speech are this turn's only
        self.kv.park(prompt.cache_key, ParkedTalker(slot, job.embeds[:job.user], prompt.rows_tag), prompt.keep)

    @torch.inference_mode()
    def prefill_batch(self, jobs: list[TalkerPrefillJob]) -> list[TalkerFrame | None | InvalidInput]:
        """The next chunk of several prompts (`prefill_step` of each) as one forward, each padded to the longest
        (turns that start together). A closed session's result is its InvalidInput, for its caller to raise."""
        return prefill_chunks(jobs, self.prefill_step, self._prefill_padded, lambda _: False,
                              "the Talker session is closed")

    def _prefill_padded(self, jobs: list[TalkerPrefillJob]) -> list[TalkerFrame | None]:
        spans = [job.next_chunk(self.prefill_chunk) for job in jobs]
        embeds, positions, lengths = padded_chunks([(job.embeds[a:b], job.position_ids[:, 0, a:b])
                                                    for job, (a, b) in zip(jobs, spans)])
        out = self.kv.forward(self.model, [job.session.kv for job in jobs], embeds, positions, lengths=lengths)
        ending = [row for row, (job, (_, b)) in enumerate(zip(jobs, spans)) if b == len(job.embeds) > job.user]
        frames: list[TalkerFrame | None] = [None] * len(jobs)
        if ending:
            last = torch.stack([out.last_hidden_state[row, lengths[row] - 1] for row in ending])[:, None]
            for row, frame in zip(ending, self._frames([jobs[row].session for row in ending], last), strict=True):
                frames[row] = frame
        return frames

    @torch.inference_mode()
    def prefill_step(self, job: TalkerPrefillJob) -> TalkerFrame | None:
        """Prefill the job's next chunk (`prefill_chunk` positions); after the last one, the first frame (none when
        prefilling the user parts only)."""
        if job.session.closed:
            raise InvalidInput("the Talker session is closed")
        a, b = job.next_chunk(self.prefill_chunk)
        out = self.kv.forward(self.model, [job.session.kv], job.embeds[None, a:b], job.position_ids[:, :, a:b])
        if b < job.embeds.shape[0] or job.user == len(job.embeds):
            return None
        return self._frames([job.session], out.last_hidden_state)[0]

    @torch.inference_mode()
    def warm(self, max_batch: int = 1) -> None:
        """Trace the step of each batch size up to `max_batch` now (`KVPool.warm`): 0.04 s each at the tiny
        checkpoint's widths, not on the first step of that size."""
        self.kv.warm(self.model, max_batch)

    def check_step(self, session: TalkerSession, text_token: int) -> None:
        """What `step` would refuse, checked before a step joins a batch: one request's error never fails a step
        shared with others."""
        if session.closed:
            raise InvalidInput("the Talker session is closed")
        if session.length >= session.capacity:
            raise ResourceExhausted(f"the Talker session is full: {session.steps} c0s, its max_new_tokens")
        if text_token == TEXT_END:
            return
        if session.text_ended:
            raise InvalidInput("text token after TEXT_END")
        self._check_text_token(text_token)

    @torch.inference_mode()
    def step(self, session: TalkerSession, codec_embed_sum: Tensor, text_token: int) -> TalkerFrame:
        """codec_embed_sum: [H] from MTP for the previous frame; text_token: the next released token or TEXT_END."""
        self.check_step(session, text_token)
        return self.step_batch([session], codec_embed_sum.reshape(1, -1), [text_token])[0]

    @torch.inference_mode()
    def step_batch(self, sessions: list[TalkerSession], codec_embed_sums: Tensor,
                   text_tokens: list[int]) -> list[TalkerFrame]:
        """One step of several requests (checked with `check_step`): codec_embed_sums [B, H], a text token or
        TEXT_END per row. Each row samples its c0 with its own sampler."""
        texts = []
        for session, token in zip(sessions, text_tokens, strict=True):
            if token == TEXT_END:
                texts.append(self._tts_pad if session.text_ended else self._tts_eos)
                session.text_ended = True
            else:
                texts.append(None)
        spoken = [i for i, t in enumerate(texts) if t is None]
        if spoken:
            for i, embedded in zip(spoken, self._embed_text([text_tokens[i] for i in spoken])):
                texts[i] = embedded
        embeds = codec_embed_sums.to(self.device, self.dtype) + torch.stack(texts)
        positions = torch.cat([step_positions(s.length, 1, s.rope_delta) for s in sessions], dim=1)
        hidden = self.kv.step(self.model, [s.kv for s in sessions], embeds[:, None], positions.to(self.device))
        return self._frames(sessions, hidden)

    def _frames(self, sessions: list[TalkerSession], last_hidden_state: Tensor) -> list[TalkerFrame]:
        """Each row's c0, drawn by its own sampler from the codec head over its last position."""
        hidden = last_hidden_state[:, -1]
        c0s = sample_rows([session.sampler for session in sessions], self.codec_head(hidden))
        for session in sessions:
            session.steps += 1
        return [TalkerFrame(c0=c0, hidden=hidden[row]) for row, c0 in enumerate(c0s)]

    def _embed_text(self, ids) -> Tensor:
        ids = torch.as_tensor(ids, device=self.device)
        return self.text_projection(self.text_embedding(ids))

    def _check_text_token(self, token: int) -> None:
        vocab = self.text_embedding.num_embeddings
        if not 0 <= token < vocab:
            raise InvalidInput(f"text token {token} is outside the vocabulary [0, {vocab})")

    def _user_mask(self, ids: Tensor) -> Tensor:
        """[L] bool: positions whose latest '<|im_start|>' opens a user turn (the reference's role lookup)."""
        positions = torch.arange(len(ids), device=ids.device)
        starts = torch.where(ids == self.im_start_id, positions, -1)
        turn_start = torch.cummax(starts, dim=0).values.clamp_min(0)
        return ids[(turn_start + 1).clamp_max(len(ids) - 1)] == self.user_id

    def _user_embeds(self, ids: Tensor, user: Tensor, prompt: TalkerPrompt, parked: ParkedTalker | None) -> Tensor:
        """[U, H] the inputs at the user positions: text embeddings, and the projected `mm_hidden` at the media;
        where `mm_hidden` starts at `mm_from`, the inputs before it are copied from `parked`."""
        mm = torch.isin(ids, self.mm_token_ids)
        n_mm, mm_hidden = int(mm.sum()), prompt.mm_hidden
        rows = 0 if mm_hidden is None else len(mm_hidden)
        width = self.hidden_projection.linear_fc1.in_features
        head = n_mm - rows  # placeholders whose rows were not sent
        fits = 0 <= prompt.mm_from <= n_mm and head in (0, prompt.mm_from)
        if not fits or (rows and tuple(mm_hidden.shape[1:]) != (width,)):
            got = None if mm_hidden is None else tuple(mm_hidden.shape)
            raise InvalidInput(f"the prompt has {n_mm} multimodal placeholders and mm_from {prompt.mm_from}: "
                               f"mm_hidden must be ({n_mm}, {width}) or ({n_mm - prompt.mm_from}, {width}), got {got}")
        out = torch.empty(int(user.sum()), self._tts_pad.shape[-1], device=self.device, dtype=self.dtype)
        user_mm = mm[user]
        out[~user_mm] = self._embed_text(ids[user & ~mm])
        at = user_mm.nonzero()[:, 0]  # where the user turns' placeholders sit in `out`, in order
        in_user = user[mm]  # [N_mm]: the placeholder is in a user turn
        kept = int(in_user[:head].sum())  # the user placeholders whose inputs come from `parked`
        if kept:
            if (parked is None or not prompt.rows_tag or parked.rows_tag != prompt.rows_tag
                    or len(parked.user_embeds) <= int(at[kept - 1])):
                raise PrefixGone("the Talker replica no longer holds the turn's earlier media inputs: send mm_hidden "
                                 "whole")
            out[at[:kept]] = parked.user_embeds[at[:kept]]
        if kept < len(at):
            out[at[kept:]] = self.hidden_projection(mm_hidden.to(self.device, self.dtype)[in_user[head:]])
        return out


def _load_plain(build, state_dict: dict[str, Tensor], device: str, dtype: torch.dtype) -> nn.Module:
    """A plain nn.Module (not a PreTrainedModel) built on `meta` and given the checkpoint's tensors."""
    with torch.device("meta"):
        module = build()
    module.load_state_dict(state_dict, assign=True, strict=True)
    return module.to(device, dtype).eval()
