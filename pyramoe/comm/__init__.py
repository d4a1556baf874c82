"""Process topology and collectives on torch.distributed. Model code never imports this package;
`pyramoe.parallel` applies it to a built model."""

from pyramoe.comm.all_to_all import all_to_all
from pyramoe.comm.exchange import (
    Exchange,
    FlatExchange,
    HierarchicalExchange,
    build_exchange,
    counts_to_host,
    transposed_run_order,
)
from pyramoe.comm.topology import ProcessGroups, Topology, layer_ep

__all__ = [
    "Exchange",
    "FlatExchange",
    "HierarchicalExchange",
    "ProcessGroups",
    "Topology",
    "all_to_all",
    "build_exchange",
    "counts_to_host",
    "layer_ep",
    "transposed_run_order",
]
