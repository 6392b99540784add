"""Open a Qwen3-Omni checkpoint directory and load one stage's modules from only that stage's tensors.

A stage reads the tensors under its own prefixes (`code2wav.`, `talker.code_predictor.`, ...) with safetensors'
`safe_open`, never the rest, so a Code2Wav replica never holds Thinker weights. The renaming and MoE expert fusion
that checkpoints need are transformers' own (`from_pretrained(state_dict=...)` applies its conversion mapping).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from services.errors import CheckpointError

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MODEL_TYPE = "qwen3_omni_moe"


@dataclass
class Checkpoint:
    """A validated checkpoint directory: its config, processor files and tensor index (name -> file)."""

    path: Path
    config: object  # transformers.Qwen3OmniMoeConfig
    weight_map: dict[str, str]
    # Names of every tensor read so far, in order: what a stage actually opened (tests assert on it).
    read_log: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        from transformers import Qwen3OmniMoeConfig

        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint directory {path} does not exist")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_file} is not valid JSON: {e}") from e
        model_type = raw.get("model_type")
        if model_type != MODEL_TYPE:
            raise CheckpointError(
                f"{config_file} is a {model_type!r} config, not Qwen3-Omni ({MODEL_TYPE!r})"
            )
        config = Qwen3OmniMoeConfig.from_pretrained(path)
        return cls(path=path, config=config, weight_map=_weight_map(path))

    def names(self, prefix: str) -> list[str]:
        return [n for n in self.weight_map if n.startswith(prefix)]

    def read(self, prefix: str, exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """Tensors under `prefix` (minus `exclude` prefixes), keyed without `prefix`."""
        wanted = [n for n in self.names(prefix) if not n.startswith(exclude)] if exclude else self.names(prefix)
        if not wanted:
            raise CheckpointError(f"{self.path} holds no tensors under {prefix!r}")
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in wanted:
            by_file[self.weight_map[name]].append(name)
        out = {}
        for file, names in by_file.items():
            with safe_open(self.path / file, framework="pt", device="cpu") as f:
                for name in names:
                    out[name[len(prefix):]] = f.get_tensor(name)
                    self.read_log.append(name)
        return out

    def read_one(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path} has no tensor {name!r}")
        with safe_open(self.path / self.weight_map[name], framework="pt", device="cpu") as f:
            self.read_log.append(name)
            return f.get_tensor(name)


def _weight_map(path: Path) -> dict[str, str]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a safetensors index: {e}") from e
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{path} is missing weight shards named in {INDEX_FILE}: {', '.join(missing)}")
        return weight_map
    single = path / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt", device="cpu") as f:
            return {name: SINGLE_FILE for name in f.keys()}
    raise CheckpointError(f"{path} has no weights: neither {SINGLE_FILE} nor {INDEX_FILE}")


def _register_talker_expert_fusion() -> None:
    """transformers fuses the Talker's per-expert tensors only when it loads the whole model (the mapping hangs
    off the root `qwen3_omni_moe` type); a Talker loaded alone needs the same Qwen2-MoE fusion under its own type."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

    if get_checkpoint_conversion_mapping(TALKER_TEXT_TYPE) is None:
        register_checkpoint_conversion_mapping(TALKER_TEXT_TYPE, get_checkpoint_conversion_mapping("qwen2_moe"))


TALKER_TEXT_TYPE = "qwen3_omni_moe_talker_text"


def load_pretrained_part(cls, config, state_dict: dict[str, torch.Tensor], device: str, dtype: torch.dtype):
    """Build `cls(config)` and load `state_dict` through transformers (key conversion, expert fusion)."""
    import transformers

    _register_talker_expert_fusion()

    verbosity = transformers.logging.get_verbosity()
    # No per-stage progress bars or "unrecognized rope key" noise: the caller logs one line per stage.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        module, info = cls.from_pretrained(
            None, config=config, state_dict=state_dict, dtype=dtype, device_map=device, output_loading_info=True
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    missing = [k for k in info["missing_keys"] if not k.endswith("inv_freq")]
    if missing:
        raise CheckpointError(f"{cls.__name__}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    if info["unexpected_keys"]:
        raise CheckpointError(f"{cls.__name__}: unexpected tensors {sorted(info['unexpected_keys'])[:3]}")
    return module.eval()


def parameter_bytes(*modules: torch.nn.Module) -> int:
    seen = set()
    total = 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
