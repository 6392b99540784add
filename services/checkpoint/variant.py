"""Which of the report's released models a checkpoint is (section 1.5, 2.2), and what it serves.

    instruct   Qwen3-Omni-30B-A3B-Instruct: Thinker + Talker; text, audio, image and video in; text and speech out
    thinking   Qwen3-Omni-30B-A3B-Thinking: the Thinker alone, reasoning in <think>...</think> before it answers
    captioner  Qwen3-Omni-30B-A3B-Captioner: the Instruct Thinker fine-tuned to caption audio; one audio in,
               no prompt, a single turn, text out

What tells them apart:
- Speech: `enable_audio_output` in config.json (what `Qwen3OmniMoeForConditionalGeneration` builds its Talker and
  Code2Wav from) and the `talker.` and `code2wav.` tensors. The Thinking and Captioner checkpoints ship the flag
  off and the Thinker's tensors only.
- Thinking: its name, or a chat template that renders reasoning (`<think>`) where the checkpoint has no Talker.
- Captioner: its name. Nothing published in its config or chat template sets it apart from a text-only Instruct,
  so it is known by the name it is published under: config.json's `_name_or_path`, the directory's own name, or
  the repository's in a Hugging Face cache (`models--Qwen--Qwen3-Omni-30B-A3B-Captioner/snapshots/<revision>`).

Reasoning itself is read off the tokens, whatever the variant: `<think>` and `</think>` are single tokens of the
Qwen vocabulary (`reasoning_tags`), so a checkpoint with a Talker that ever writes them never speaks them either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from services.errors import CheckpointError

KINDS = ("instruct", "thinking", "captioner")
TITLES = {"instruct": "Qwen3-Omni Instruct", "thinking": "Qwen3-Omni Thinking", "captioner": "Qwen3-Omni Captioner"}
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SPEECH_PREFIXES = ("talker.", "code2wav.")
ALL_INPUTS = ("text", "audio", "image", "video")
CAPTIONER_RULES = ("one audio and nothing else: no text, image, video, system prompt or earlier turns (a single "
                   "turn); it answers with the audio's caption, as text")


@dataclass(frozen=True)
class Variant:
    kind: str  # one of KINDS
    speech: bool  # the checkpoint has a Talker and Code2Wav

    @property
    def title(self) -> str:
        return TITLES[self.kind]

    @property
    def reasoning(self) -> bool:
        return self.kind == "thinking"

    @property
    def input_modalities(self) -> tuple[str, ...]:
        return ("audio",) if self.kind == "captioner" else ALL_INPUTS

    @property
    def output_modalities(self) -> tuple[str, ...]:
        return ("text", "audio") if self.speech else ("text",)

    @property
    def input_rules(self) -> str:
        return CAPTIONER_RULES if self.kind == "captioner" else ""

    def describe(self) -> str:
        """One line for logs and the CLI: "Qwen3-Omni Thinking: text, audio, image, video in; text out; ..."."""
        line = f"{self.title}: {', '.join(self.input_modalities)} in; {' and '.join(self.output_modalities)} out"
        if self.reasoning:
            line += "; reasoning streamed apart from the answer"
        if self.input_rules:
            line += f"; takes {self.input_rules}"
        return line


INSTRUCT = Variant("instruct", speech=True)


def detect_variant(ckpt) -> Variant:
    """The variant of a `services.checkpoint.loading.Checkpoint`, from its config, tensors, name and chat
    template; a config that enables audio output without the tensors for it is a CheckpointError."""
    speech = _has_speech(ckpt)
    names = [n.lower() for n in checkpoint_names(ckpt.path)]
    if any("captioner" in n for n in names):
        return Variant("captioner", speech=False)  # text out, whatever the tensors: the model was trained so
    if any("thinking" in n for n in names) or (not speech and THINK_OPEN in chat_template(ckpt.path)):
        return Variant("thinking", speech)
    return Variant("instruct", speech)


def _has_speech(ckpt) -> bool:
    if not getattr(ckpt.config, "enable_audio_output", True):
        return False
    missing = [p for p in SPEECH_PREFIXES if not ckpt.names(p)]
    if missing:
        raise CheckpointError(
            f"{ckpt.path}/config.json enables audio output but the checkpoint holds no "
            f"{' or '.join(repr(p + '*') for p in missing)} tensors: set enable_audio_output to false to serve it "
            "as text only")
    return True


def checkpoint_names(path: str | Path) -> list[str]:
    """The names a checkpoint goes by: config.json's `_name_or_path`, its directory's name, and the repository's
    for a snapshot in a Hugging Face cache (`models--<org>--<name>/snapshots/<revision>`)."""
    path = Path(path).resolve()
    names = [path.name]
    try:
        saved = json.loads((path / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        saved = None
    if isinstance(saved, str) and saved:
        names.append(saved)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        names.append(path.parent.parent.name.split("--")[-1])
    return names


def chat_template(path: str | Path) -> str:
    """The checkpoint's chat template source ("" without one): `chat_template.jinja` (what transformers 5
    saves), `chat_template.json`, or tokenizer_config.json's `chat_template`."""
    path = Path(path)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    for name, key in (("chat_template.json", "chat_template"), ("tokenizer_config.json", "chat_template")):
        try:
            value = json.loads((path / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, list):  # named templates: [{"name": ..., "template": ...}]
            value = "\n".join(t.get("template", "") for t in value if isinstance(t, dict))
        if isinstance(value, str) and value:
            return value
    return ""


@dataclass(frozen=True)
class ReasoningTags:
    """How a checkpoint marks reasoning: the token ids of `<think>` and `</think>`, and whether the generation
    prompt itself opens the block (the model then writes only `</think>`)."""

    open_id: int
    close_id: int
    opened_by_prompt: bool = False


def reasoning_tags(processor) -> ReasoningTags | None:
    """The reasoning tags of a processor's tokenizer and chat template; None when the tokenizer has no single
    `<think>` and `</think>` tokens."""
    tokenizer = processor.tokenizer
    ids = [tokenizer.encode(tag, add_special_tokens=False) for tag in (THINK_OPEN, THINK_CLOSE)]
    if any(len(i) != 1 for i in ids):
        return None
    opened = False
    if THINK_OPEN in (getattr(processor, "chat_template", None) or ""):
        prompt = processor.apply_chat_template([{"role": "user", "content": "?"}], add_generation_prompt=True,
                                               tokenize=False)
        opened = prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)
    return ReasoningTags(ids[0][0], ids[1][0], opened)
