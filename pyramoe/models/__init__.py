"""Models built from configs: the GPT-MoE decoder."""

from pyramoe.models.gpt import GPT, GPTOutput, count_active_parameters, count_parameters

__all__ = ["GPT", "GPTOutput", "count_active_parameters", "count_parameters"]
