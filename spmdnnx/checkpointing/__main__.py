"""``python -m spmdnnx.checkpointing PATH``: prints `describe(PATH)`."""

import sys

from spmdnnx import errors
from spmdnnx.checkpointing._oneshot import describe


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print("usage: python -m spmdnnx.checkpointing CHECKPOINT_PATH", file=sys.stderr)
    return 2
  try:
    print(describe(argv[1]))
  except errors.CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
