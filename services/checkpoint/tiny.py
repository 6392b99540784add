"""`omni checkpoint tiny`: a real Hugging Face Qwen3-Omni checkpoint with random weights and tiny dimensions.

Every special token id, codec id and speaker id is the released model's; only widths and depths shrink
(DESIGN.md section 4), so the same code paths run as on the real 30B checkpoint. `variant` picks which released
model it stands for (`services.checkpoint.variant`): the Instruct (Thinker and Talker), or the Thinking or
Captioner checkpoint, which ship `enable_audio_output: false` and the Thinker's tensors only; the Thinking one's
chat template renders reasoning (`<think>...</think>`) as Qwen's Thinking templates do.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from services.checkpoint.tokenizer import build_qwen_tokenizer
from services.errors import InvalidInput

log = logging.getLogger(__name__)

# Token ids shared by the Thinker and the Talker configs (the released model's).
_MM_TOKEN_IDS = dict(
    audio_token_id=151675,
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    audio_start_token_id=151669,
    position_id_per_seconds=13,
    seconds_per_chunk=2,
)

TINY_CONFIG: dict = dict(
    architectures=["Qwen3OmniMoeForConditionalGeneration"],
    model_type="qwen3_omni_moe",
    enable_audio_output=True,
    im_start_token_id=151644,
    im_end_token_id=151645,
    system_token_id=8948,
    user_token_id=872,
    assistant_token_id=77091,
    tts_pad_token_id=151671,
    tts_bos_token_id=151672,
    tts_eos_token_id=151673,
    thinker_config=dict(
        **_MM_TOKEN_IDS,
        audio_end_token_id=151670,
        vision_end_token_id=151653,
        user_token_id=872,
        tie_word_embeddings=False,
        audio_config=dict(
            num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, d_model=64,
            output_dim=64, downsample_hidden_size=32, n_window=50, n_window_infer=800, conv_chunksize=500,
            max_source_positions=1500, activation_function="gelu", scale_embedding=False,
        ),
        vision_config=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=4, in_channels=3, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=2304,
            deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh",
        ),
        text_config=dict(
            vocab_size=152064, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=0, norm_topk_prob=True, max_position_embeddings=65536,
            rms_norm_eps=1e-6, use_qk_norm=True, tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=1000000, mrope_section=[2, 3, 3],
                                 interleaved=True, mrope_interleaved=True),
        ),
    ),
    talker_config=dict(
        **_MM_TOKEN_IDS,
        audio_end_token_id=151670,
        accept_hidden_layer=1,
        thinker_hidden_size=64,
        num_code_groups=16,
        spatial_merge_size=2,
        codec_bos_id=2149,
        codec_eos_token_id=2150,
        codec_nothink_id=2155,
        codec_pad_id=2148,
        codec_think_bos_id=2156,
        codec_think_eos_id=2157,
        speaker_id={"chelsie": 2301, "ethan": 2302, "aiden": 2303},
        tie_word_embeddings=False,
        text_config=dict(
            vocab_size=3072, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=64, norm_topk_prob=True, max_position_embeddings=65536,
            rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=1000000, mrope_section=[2, 3, 3],
                                 interleaved=True),
        ),
        code_predictor_config=dict(
            vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_code_groups=16, max_position_embeddings=32768,
            rms_norm_eps=1e-6, layer_types=["full_attention"], tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=1000000),
        ),
    ),
    code2wav_config=dict(
        codebook_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, num_quantizers=16, decoder_dim=64, sliding_window=72,
        upsample_rates=[8, 5, 4, 3], upsampling_ratios=[2, 2], max_position_embeddings=8000,
        rope_parameters=dict(rope_type="default", rope_theta=10000),
    ),
)

# Speech-output system prompt of the released model (DESIGN.md section 4).
DEFAULT_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory "
    "and visual inputs, as well as generating text and speech."
)

# Qwen's Thinking templates: an assistant message after the last user query (a tool step of the answer being
# written) keeps its reasoning as `<think>\n...\n</think>\n\n` before its content; earlier answers lose it. The
# reasoning is `reasoning_content` or what the content holds before `</think>`. The generation prompt is
# `<|im_start|>assistant\n`: the model opens the block itself.
_LAST_QUERY = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
)
_ASSISTANT_WITH_REASONING = (
    "{%- set content = message['content'] %}"
    "{%- set reasoning = message['reasoning_content'] if message['reasoning_content'] is defined "
    "and message['reasoning_content'] is string else '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}"
    "{%- set content = content.split('</think>')[-1] %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query %}"
    "{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- content.lstrip('\\n') }}{%- endif %}"
)


def _chat_template(reasoning: bool) -> str:
    """Qwen ChatML with Qwen3-Omni's multimodal placeholders and Qwen's tool-call convention; `reasoning`: the
    Thinking model's handling of `<think>` in assistant messages."""
    string_content = "{{- message['content'] }}"
    if reasoning:
        string_content = (f"{{%- if message['role'] == 'assistant' %}}{_ASSISTANT_WITH_REASONING}"
                          f"{{%- else %}}{string_content}{{%- endif %}}")
    return (_LAST_QUERY if reasoning else "") + _CHAT_TEMPLATE.replace("{{STRING_CONTENT}}", string_content)


_CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{{- messages[0]['content'] }}"
    "{%- else %}{%- for part in messages[0]['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}{{- '\\n\\n' }}"
    "{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{%- if message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{STRING_CONTENT}}"
    "{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'audio' or 'audio' in part or 'audio_url' in part %}"
    "{{- '<|audio_start|><|audio_pad|><|audio_end|>' }}"
    "{%- elif part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or 'video' in part %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
    "{{- fn['arguments'] if fn['arguments'] is string else fn['arguments'] | tojson }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHAT_TEMPLATE = _chat_template(reasoning=False)  # the Instruct's (and, as published, the Captioner's)
THINKING_CHAT_TEMPLATE = _chat_template(reasoning=True)
VARIANTS = ("instruct", "thinking", "captioner")


def tiny_config(variant: str = "instruct"):
    """The tiny config of a variant: the Thinking and Captioner ones have no Talker (`enable_audio_output` off)."""
    from transformers import Qwen3OmniMoeConfig

    if variant not in VARIANTS:
        raise InvalidInput(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    return Qwen3OmniMoeConfig(**{**copy.deepcopy(TINY_CONFIG), "enable_audio_output": variant == "instruct"})


def build_processor(chat_template: str = CHAT_TEMPLATE):
    """The Qwen3-Omni processor: real Qwen tokenizer, 128-bin Whisper features, Qwen2-VL image/video patches."""
    from transformers import Qwen3OmniMoeProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    vision = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image_processor = Qwen2VLImageProcessor(
        **vision, size={"shortest_edge": 4 * 32 * 32, "longest_edge": 1280 * 32 * 32}
    )
    video_processor = Qwen2VLVideoProcessor(
        **vision, size={"shortest_edge": 4 * 32 * 32, "longest_edge": 768 * 32 * 32}
    )
    feature_extractor = WhisperFeatureExtractor(
        feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=300, n_fft=400,
        padding_side="right", return_attention_mask=True,
    )
    return Qwen3OmniMoeProcessor(
        image_processor=image_processor,
        video_processor=video_processor,
        feature_extractor=feature_extractor,
        tokenizer=build_qwen_tokenizer(),
        chat_template=chat_template,
    )


def _init_talker_experts(model) -> None:
    """transformers 5.23 allocates the Talker's fused expert weights with torch.empty and its _init_weights never
    fills them: they would hold whatever memory was there (not reproducible, possibly inf/NaN). Draw them from the
    seeded generator like the Thinker's experts."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeTalkerTextExperts

    std = model.config.talker_config.text_config.initializer_range
    with torch.no_grad():
        for module in model.talker.modules():
            if isinstance(module, Qwen3OmniMoeTalkerTextExperts):
                module.gate_up_proj.normal_(0.0, std)
                module.down_proj.normal_(0.0, std)


def _init_talker_projections(model) -> None:
    """With every weight at std 0.02, the Talker's text and multimodal projections come out ~1e-4 against codec
    embeddings of ~0.02: a random Talker would ignore what it is told to say, and no test could see text steer the
    codes. Drawing the projections at 1/sqrt(fan_in) gives them the codec embeddings' scale, as in a trained model."""
    with torch.no_grad():
        for mlp in (model.talker.text_projection, model.talker.hidden_projection):
            for linear in (mlp.linear_fc1, mlp.linear_fc2):
                linear.weight.normal_(0.0, linear.in_features ** -0.5)


def write_random_checkpoint(out_dir: str | Path, config, seed: int = 0, max_shard_size: str | int | None = None,
                            chat_template: str = CHAT_TEMPLATE) -> Path:
    """Write `config` with seeded random weights, the tokenizer and the processor to `out_dir`."""
    from transformers import GenerationConfig, Qwen3OmniMoeForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(config).eval()
    if model.has_talker:  # without it the model holds, and saves, the Thinker's tensors only
        _init_talker_experts(model)
        _init_talker_projections(model)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("random Qwen3-Omni: %.1f M parameters, seed %d -> %s", n_params / 1e6, seed, out)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **kwargs)
    GenerationConfig(eos_token_id=config.im_end_token_id, pad_token_id=151643).save_pretrained(out)
    build_processor(chat_template).save_pretrained(out)
    return out


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0, max_shard_size: str | int | None = None,
                          variant: str = "instruct") -> Path:
    """The tiny checkpoint of a variant: config, weights (sharded when `max_shard_size` is given), tokenizer,
    processor."""
    template = THINKING_CHAT_TEMPLATE if variant == "thinking" else CHAT_TEMPLATE
    out = write_random_checkpoint(out_dir, tiny_config(variant), seed=seed, max_shard_size=max_shard_size,
                                  chat_template=template)
    # The name a checkpoint is published under is how a Captioner is known (services.checkpoint.variant);
    # transformers 5 leaves `_name_or_path` out of what it saves, so it is written here.
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config["_name_or_path"] = f"tiny-Qwen3-Omni-{variant.capitalize()}"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
