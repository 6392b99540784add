"""All stage engines of one checkpoint in one process: what the in-process conductor and `omni generate` use."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from services.checkpoint.loading import Checkpoint
from services.checkpoint.variant import Variant, detect_variant
from services.config import WARM_BATCH, EngineConfig
from services.engines.audio_encoder import AudioEncoderEngine
from services.engines.code2wav import Code2WavEngine
from services.engines.mtp import MTPEngine
from services.engines.talker import TalkerEngine
from services.engines.thinker import ThinkerEngine
from services.engines.vision_encoder import VisionEncoderEngine
from services.preprocess import load_processor

log = logging.getLogger(__name__)


@dataclass
class Engines:
    processor: object  # transformers Qwen3OmniMoeProcessor
    audio: AudioEncoderEngine
    vision: VisionEncoderEngine
    thinker: ThinkerEngine
    talker: TalkerEngine | None
    mtp: MTPEngine | None
    code2wav: Code2WavEngine | None
    thinker_stop_ids: frozenset[int]
    variant: Variant

    @classmethod
    def load(cls, model_dir: str | Path, config: EngineConfig = EngineConfig(), audio_output: bool = True) -> "Engines":
        """Every stage the checkpoint has; the speech stages only with `audio_output` and a Talker in it."""
        ckpt = Checkpoint.open(model_dir)
        variant = detect_variant(ckpt)
        speech = audio_output and variant.speech
        t = time.perf_counter()
        processor = load_processor(ckpt.path)
        engines = cls(
            processor=processor,
            audio=AudioEncoderEngine.from_checkpoint(ckpt, config),
            vision=VisionEncoderEngine.from_checkpoint(ckpt, config),
            thinker=ThinkerEngine.from_checkpoint(ckpt, config),
            talker=TalkerEngine.from_checkpoint(ckpt, config) if speech else None,
            mtp=MTPEngine.from_checkpoint(ckpt, config) if speech else None,
            code2wav=Code2WavEngine.from_checkpoint(ckpt, config) if speech else None,
            # The reference stops the Thinker on <|im_end|> only (generate's thinker_eos_token_id).
            thinker_stop_ids=frozenset({ckpt.config.im_end_token_id}),
            variant=variant,
        )
        log.info("loaded %s, %s, in %.1f s (%s)", ckpt.path, variant.title, time.perf_counter() - t,
                 engines.describe())
        return engines

    def warm(self, max_batch: int = WARM_BATCH) -> None:
        """Trace the decoding stages' steps of every batch size up to `max_batch`, as their replicas do at startup
        (`services.config.WARM_BATCH`): where turns will run together (a benchmark, a server)."""
        for engine in (self.thinker, self.talker, self.mtp, self.code2wav):
            if engine is not None:
                engine.warm(max_batch)

    def describe(self) -> str:
        parts = [(n, getattr(self, n)) for n in ("audio", "vision", "thinker", "talker", "mtp", "code2wav")]
        return ", ".join(f"{n} {e.parameter_bytes / 2**20:.1f} MiB" for n, e in parts if e is not None)
