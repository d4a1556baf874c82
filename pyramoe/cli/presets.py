"""`pyramoe presets`: list the named model presets with their parameter counts."""

from __future__ import annotations

import argparse

import torch

from pyramoe.models import GPT, count_active_parameters, count_parameters
from pyramoe.presets import PAPER_PARAMETERS, PRESETS, get_preset
from pyramoe.tables import format_table


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("presets", help="list model presets and their sizes (built on the meta device)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    rows = []
    for name in PRESETS:
        config = get_preset(name)
        with torch.device("meta"):
            model = GPT(config)
        experts = sorted({layer.moe.num_experts for layer in config.layers if layer.moe})
        residual = any(layer.moe.use_residual for layer in config.layers if layer.moe)
        paper = PAPER_PARAMETERS.get(name)
        rows.append([
            name, config.n_layers, config.d_model, len(config.moe_layer_ids),
            "/".join(map(str, experts)) or "-", "yes" if residual else "-",
            f"{count_parameters(model) / 1e6:,.1f}M", f"{count_active_parameters(model) / 1e6:,.1f}M",
            f"{paper / 1e9:g}B" if paper else "-",
        ])
    headers = ["preset", "layers", "d_model", "moe layers", "experts", "residual", "params", "active", "paper"]
    print(format_table(headers, rows))
    return 0
