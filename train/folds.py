"""Fold → task split (reference-method §5.1).

Fold f trains with ``itertools.combinations(range(5), 3)[f]`` and validates with the two remaining task
ids, as the reference's ``get_task_split``; every fold uses all training and validation images.
"""
from __future__ import annotations

import operator
from itertools import combinations

N_TASKS = 5
N_TRAIN_TASKS = 3
_SPLITS = tuple(combinations(range(N_TASKS), N_TRAIN_TASKS))
N_FOLDS = len(_SPLITS)  # 10


def fold_tasks(fold: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(training task ids, validation task ids) of ``fold`` in 0…9, both ascending."""
    try:
        index = None if isinstance(fold, bool) else operator.index(fold)  # ints and numpy ints, not 2.0
    except TypeError:
        index = None
    if index is None or not 0 <= index < N_FOLDS:
        raise ValueError(f"fold must be an integer in 0..{N_FOLDS - 1}, got {fold!r}")
    train = _SPLITS[index]
    return train, tuple(t for t in range(N_TASKS) if t not in train)
