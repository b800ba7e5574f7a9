"""Data: length-generalisation generators, the authors' text format, packed splits and batches.

- :mod:`.lengthgen` — seeded vectorised generators for copy, reverse, sort, MQMTAR; ``task_vocab``.
- :mod:`.formats` — ``<split>.src/.trg`` + ``.idx`` + ``manifest.json``; ``pack`` and ``PackedSplit``.
- :mod:`.batching` — ``make_batch`` (x, y, loss_mask, lengths), target positions, epoch order.
"""

from .batching import epoch_permutation, make_batch, target_mask, target_positions
from .formats import (
    PackedSplit,
    list_shards,
    list_splits,
    load_index,
    pack,
    read_example,
    read_lines,
    read_manifest,
    shards,
    split_count,
)
from .lengthgen import TASKS, dataset_dir, task_params, task_vocab

__all__ = [
    "TASKS", "PackedSplit", "dataset_dir", "epoch_permutation", "list_shards", "list_splits",
    "load_index", "make_batch", "pack", "read_example", "read_lines", "read_manifest", "shards",
    "split_count", "target_mask", "target_positions", "task_params", "task_vocab",
]
