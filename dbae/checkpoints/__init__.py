"""Checkpoints: every file format of the package's weights, and the importers of foreign ones.

One room below training and inference, which both use it:

- :mod:`.atomic`: writing any file so that a crash never leaves half of it under its name;
- :mod:`.integrity`: safetensors files that carry the sha256 of their own contents, and the
  one reader that checks them;
- :mod:`.manifest`: the sha256 of every checkpoint of a run, beside them;
- :mod:`.native`: the DBAE checkpoint format (weights, EMA weights, optimizer state and
  the typed configuration), the weights-file layout every trained method shares, and finding the newest intact one in a run directory;
- :mod:`.foreign`: reading other projects' PyTorch pickles safely (``weights_only``) and
  telling their kinds apart;
- :mod:`.official_dbae`: the authors' released DBAE checkpoints and classifier, converted
  to the native format with their exact numerics.
"""

from .atomic import PARTIAL_SUFFIX, atomic_write, atomic_write_text, remove_partial_files
from .integrity import read_header, read_safetensors, verify_file, write_safetensors
from .native import (
    FORMAT,
    OTHER_KINDS,
    Checkpoint,
    checkpoint_name,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_state_strict,
    load_weights,
    read_metadata,
    read_tagged_safetensors,
    read_weights_file,
    resolve_checkpoint,
    save_checkpoint,
    split_weights,
    verify_checkpoint,
    write_weights_file,
)

__all__ = [
    "FORMAT", "OTHER_KINDS", "PARTIAL_SUFFIX", "Checkpoint", "atomic_write", "atomic_write_text",
    "checkpoint_name", "latest_valid_checkpoint", "list_checkpoints", "load_checkpoint", "load_state_strict",
    "load_weights", "read_header", "read_metadata", "read_safetensors", "read_tagged_safetensors", "read_weights_file",
    "remove_partial_files",
    "resolve_checkpoint", "save_checkpoint", "split_weights", "verify_checkpoint", "verify_file",
    "write_safetensors", "write_weights_file",
]
