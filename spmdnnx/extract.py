"""Flax's ``nnx.extract`` namespace: the prefix types transforms read.

>>> import spmdnnx as nnx
>>> m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
>>> type(nnx.prefix(m, {...: 0}, graph=True)) is nnx.extract.TreeState
True
"""

from spmdnnx._transforms.prefixes import TreeState as TreeState
from spmdnnx._transforms.prefixes import prefix as prefix
from spmdnnx._graph_context import clear_non_graph_nodes as clear_non_graph_nodes
