"""Checkpointing on orbax: async sharded save, restore onto any mesh, describe.

``spmdnnx.checkpointing`` (``nnx.checkpointing``; ``jax.checkpoint`` means
remat, hence the longer name) saves model, optimizer, data position and user
metadata with `CheckpointManager`, restores them in place onto any mesh, and
has one-shot `save` / `restore` for scripts and `describe` to inspect a
checkpoint without the model code. See docs/checkpointing.md.
"""

from spmdnnx.checkpointing._convert import Leaf as Leaf
from spmdnnx.checkpointing._manager import CheckpointManager as CheckpointManager
from spmdnnx.checkpointing._manager import CheckpointWarning as CheckpointWarning
from spmdnnx.checkpointing._manager import RestoreInfo as RestoreInfo
from spmdnnx.checkpointing._oneshot import describe as describe
from spmdnnx.checkpointing._oneshot import restore as restore
from spmdnnx.checkpointing._oneshot import save as save
