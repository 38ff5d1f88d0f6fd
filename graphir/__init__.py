"""graphir: the IR (dtypes, ops, nodes, graphs, text form) and the model front ends; no torch."""
