"""The real Qwen tokenizer, built offline from the BPE ranks that ship inside the `dashscope` package.

The 151,643 ranks convert (with Qwen2's split pattern) to the same ids as the released tokenizer; the added
tokens after them are Qwen3-Omni's, in the released order, so their ids match the real config's.
"""

from __future__ import annotations

import functools
from importlib import resources

from tokenizers import AddedToken
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

# Qwen3-Omni's added tokens, ids 151643.. in this order. (token, special)
ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),  # 151643
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),  # 151652
    ("<|vision_end|>", True),  # 151653
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),  # 151655
    ("<|video_pad|>", True),  # 151656
    ("<tool_call>", False),  # 151657
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),  # 151665
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
    ("<|audio_start|>", True),  # 151669
    ("<|audio_end|>", True),  # 151670
    ("<tts_pad>", True),  # 151671
    ("<tts_text_bos>", True),  # 151672
    ("<tts_text_eod>", True),  # 151673
    ("<tts_text_bos_single>", True),
    ("<|audio_pad|>", True),  # 151675
]
FIRST_ADDED_ID = 151643

# Named tokens the Qwen3-Omni processor reads off its tokenizer (`tokenizer.image_token`, ...).
MODEL_SPECIFIC_TOKENS = {
    "image_token": "<|image_pad|>",
    "audio_token": "<|audio_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
}


def tiktoken_ranks_path() -> str:
    return str(resources.files("dashscope") / "resources" / "qwen.tiktoken")


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    converter = TikTokenConverter(vocab_file=tiktoken_ranks_path(), pattern=PRETOKENIZE_REGEX)
    return converter.extract_vocab_merges_from_model(tiktoken_ranks_path())


def build_qwen_tokenizer() -> Qwen2Tokenizer:
    vocab, merges = _vocab_and_merges()
    if len(vocab) != FIRST_ADDED_ID:
        raise RuntimeError(f"qwen.tiktoken has {len(vocab)} ranks, expected {FIRST_ADDED_ID}")
    # The added tokens go into the vocabulary at their fixed ids first, so that registering them (and the
    # eos/pad tokens, which the constructor registers) cannot renumber them.
    vocab = dict(vocab) | {token: FIRST_ADDED_ID + i for i, (token, _) in enumerate(ADDED_TOKENS)}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=list(merges),
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=65536,
        extra_special_tokens=MODEL_SPECIFIC_TOKENS,
    )
    tokenizer.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in ADDED_TOKENS])
    for offset, (token, _) in enumerate(ADDED_TOKENS):
        got = tokenizer.convert_tokens_to_ids(token)
        if got != FIRST_ADDED_ID + offset:
            raise RuntimeError(f"{token} got id {got}, expected {FIRST_ADDED_ID + offset}")
    return tokenizer
