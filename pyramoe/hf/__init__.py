"""Hugging Face MoE checkpoints in and out: local config.json + safetensors directories of Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, dots.llm1 and GLM-4.5 load into pyramoe's decoder
(`load_hf_model`); pyramoe models whose features all have an HF counterpart export as one
(`export_hf`)."""

from pyramoe.hf.architectures import ARCHITECTURES, Architecture, architecture_of, model_config
from pyramoe.hf.export import choose_architecture, export_hf
from pyramoe.hf.load import HFModel, load_hf_model

__all__ = ["ARCHITECTURES", "Architecture", "HFModel", "architecture_of", "choose_architecture", "export_hf",
           "load_hf_model", "model_config"]
