"""Shared type aliases. Imports nothing from the package."""

from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence, Tuple, Union

#: One key of a graph path: an attribute name, a list index or a dict key.
Key = Hashable
#: A path from a graph root to a node or leaf, e.g. ('layers', 0, 'kernel').
PathParts = Tuple[Key, ...]
#: Logical axis names of an array: one name (or None) per dimension.
LogicalAxes = Tuple[Union[str, None], ...]
#: Anything `spmdnnx._filters.to_predicate` understands.
Filter = Any
#: An initializer: (key, shape, dtype) -> array.
Initializer = Callable[..., Any]
Shape = Sequence[int]
