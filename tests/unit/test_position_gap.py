"""benchmarks/position_gap.py: NLL bucketed by the predicted token's position, and each row's gap to the base."""
import numpy as np
import pytest

from benchmarks import position_gap as pg


def test_buckets_split_by_position_and_leave_empty_ones_out():
    nlls = [np.array([1.0, 2.0, 3.0]), np.array([5.0] * 20)]  # positions 0..2 and 0..19
    got = pg.bucket_means(nlls, edges=(0, 2, 16, 32, 64))
    assert got["0-2"] == {"nll": pytest.approx((1 + 2 + 5 + 5) / 4), "tokens": 4}
    assert got["2-16"] == {"nll": pytest.approx((3 + 5 * 14) / 15), "tokens": 15}
    assert got["16-32"] == {"nll": 5.0, "tokens": 4}
    assert "32-64" not in got and got["all"]["tokens"] == 23


def test_gaps_are_row_minus_base_per_set_and_bucket():
    base = {"passages": {"0-16": {"nll": 4.0, "tokens": 9}, "all": {"nll": 3.0, "tokens": 9}}}
    row = {"passages": {"0-16": {"nll": 4.25, "tokens": 9}, "all": {"nll": 2.5, "tokens": 9}}}
    assert pg.gaps({"base": base, "r": row}) == {"r": {"passages": {"0-16": 0.25, "all": -0.5}}}


def test_shard_sets_take_the_first_sequences_of_train_and_val_and_name_a_missing_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"input_ids": torch.arange(40, dtype=torch.int32).reshape(4, 10)}, str(tmp_path / "train.safetensors"))
    with pytest.raises(SystemExit, match="no val.safetensors"):
        pg.shard_sets(tmp_path, 2, 3)
    save_file({"input_ids": -torch.arange(40, dtype=torch.int32).reshape(4, 10)}, str(tmp_path / "val.safetensors"))
    got = pg.shard_sets(tmp_path, 2, 3)
    assert got == {"shard_train": [[0, 1, 2], [10, 11, 12]], "shard_val": [[0, -1, -2], [-10, -11, -12]]}
