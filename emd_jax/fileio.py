"""Atomic publication of output directories (exports, teacher checkpoints, samplers)."""

from __future__ import annotations

import os
import shutil


def publish_dir(tmp: str, directory: str) -> str:
  """Moves the finished directory `tmp` to `directory`, replacing any old one.

  `tmp` must be on the same filesystem (create it in `directory`'s parent). A reader sees
  either the old directory or the new one, never a partial one; a crash between the two
  renames leaves the old one beside it as `<directory>.old-*`.
  """
  if os.path.exists(directory):
    old = f"{directory}.old-{os.path.basename(tmp)}"
    os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, directory)
  return directory
