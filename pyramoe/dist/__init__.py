"""Process topology and collectives on torch.distributed. Model code never imports this package;
`pyramoe.parallel` applies it to a built model."""

from pyramoe.dist.all_to_all import all_to_all, exchange_counts
from pyramoe.dist.topology import ProcessGroups, Topology, layer_ep

__all__ = ["ProcessGroups", "Topology", "all_to_all", "exchange_counts", "layer_ep"]
