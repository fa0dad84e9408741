"""Fold table of reference-method §5.1, typed out from the specification (not recomputed)."""
import pytest

from condiff.train.folds import N_FOLDS, fold_tasks

REFERENCE_TABLE = {
    0: ((0, 1, 2), (3, 4)),
    1: ((0, 1, 3), (2, 4)),
    2: ((0, 1, 4), (2, 3)),
    3: ((0, 2, 3), (1, 4)),
    4: ((0, 2, 4), (1, 3)),
    5: ((0, 3, 4), (1, 2)),
    6: ((1, 2, 3), (0, 4)),
    7: ((1, 2, 4), (0, 3)),
    8: ((1, 3, 4), (0, 2)),
    9: ((2, 3, 4), (0, 1)),
}


def test_fold_table_matches_reference_method():
    import numpy as np

    assert fold_tasks(np.int64(4)) == REFERENCE_TABLE[4]
    assert N_FOLDS == 10
    assert {f: fold_tasks(f) for f in range(N_FOLDS)} == REFERENCE_TABLE


def test_every_task_is_validated_in_four_folds():
    counts = [sum(t in fold_tasks(f)[1] for f in range(N_FOLDS)) for t in range(5)]
    assert counts == [4] * 5


@pytest.mark.parametrize("bad", [-1, 10, 2.0, True, "3"])
def test_invalid_fold_is_refused(bad):
    with pytest.raises(ValueError, match="fold must be"):
        fold_tasks(bad)
