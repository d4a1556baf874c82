"""The engine's own view of a caller's model: a module tree of its own over the same parameter and
buffer tensors (no weight is copied), with its own copies of the configs.

The engine changes what it runs: eval mode, dropless MoE layers, weights packed at the first step
(modules swapped, plain weights dropped), modules spread over processes by `distribute`. On the
view these changes stay the engine's: the caller's model keeps its training flags, its configs and
its modules, and may go on training. Parameters are shared, but packed weights (and the native
step's fp32 norm gains and biases) are copies taken at the engine's first step.
"""

from __future__ import annotations

import copy

from torch import nn

from pyramoe.config import LayerConfig, ModelConfig, MoEConfig
from pyramoe.layers.moe import MoELayer

CONFIGS = (ModelConfig, LayerConfig, MoEConfig)  # what a view copies (small; the engine writes into them)


def inference_view(model: nn.Module, dropless: bool) -> nn.Module:
    """`model`'s view in eval mode; `dropless`: its MoE layers route every token (their config copies
    say so, the caller's configs keep what they said)."""
    view = _clone(model, {}, {})
    if dropless:
        for module in view.modules():
            if isinstance(module, MoELayer):
                module.config.dropless = True
    return view.eval()


def _clone(module: nn.Module, clones: dict[int, nn.Module], config_memo: dict) -> nn.Module:
    """A shallow copy of `module` with its own containers (parameters, buffers, children, hooks) and
    configs, and clones of its children; a module reached twice (a shared submodule) is cloned once,
    and so is a config (a layer's MoE config is also its model config's)."""
    if id(module) in clones:
        return clones[id(module)]
    clone = copy.copy(module)  # a new object whose __dict__ holds the same values
    clones[id(module)] = clone
    for name, value in list(vars(clone).items()):
        if isinstance(value, (dict, set, list)):  # nn.Module's containers: a setattr on the view stays in it
            clone.__dict__[name] = copy.copy(value)
        elif isinstance(value, CONFIGS):
            clone.__dict__[name] = copy.deepcopy(value, config_memo)
    clone._modules = {name: None if child is None else _clone(child, clones, config_memo)
                      for name, child in module._modules.items()}
    return clone
