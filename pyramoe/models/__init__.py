"""Models built from configs: the GPT-MoE decoder, and Mixture-of-Students students of it."""

from pyramoe.models.gpt import GPT, GPTOutput, count_active_parameters, count_parameters
from pyramoe.models.student import init_student_from_teacher, student_config

__all__ = ["GPT", "GPTOutput", "count_active_parameters", "count_parameters", "init_student_from_teacher",
           "student_config"]
