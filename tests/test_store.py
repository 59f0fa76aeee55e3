"""The feature store's parts: what they hold and how they are laid out in Parquet."""

import numpy as np
import pyarrow as pa

from mona_ray.features.store import rows_table


def test_float16_values_are_stored_as_float16():
    """embed.value_dtype=float16: the engine hands float16 (or float32) arrays; both are stored as float16."""
    outs = [(np.array([3, 9], np.int32), np.array([0.5, 0.25], np.float32)),
            (np.array([1], np.int32), np.array([1.5], np.float16))]
    t = rows_table(["a", "b"], [2, 1], [2, 1], outs, "float16")
    assert t.schema.field("values").type == pa.list_(pa.float16())
    assert [list(map(float, v)) for v in t.column("values").to_pylist()] == [[0.5, 0.25], [1.5]]
