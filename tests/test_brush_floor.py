"""ABN_BRUSH_FLOOR: faint attention drawn transparent, checked against the graded round trip."""

from __future__ import annotations

import numpy as np
import pytest

from backend.brush import decode_rle, encode_rle
from backend.corrections import alpha_to_map
from backend.predictions import attention_alpha
from backend.settings import Settings, SettingsError


def test_values_below_the_floor_are_transparent_and_the_rest_keep_their_level() -> None:
    attention = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    plain = attention_alpha(attention, 8, 8, levels=8)
    floored = attention_alpha(attention, 8, 8, levels=8, floor=0.15)
    below = attention < 0.15
    assert (floored[below] == 0).all()
    np.testing.assert_array_equal(floored[~below], plain[~below])
    assert (plain[below] > 0).any()  # without a floor the faint pixels tint the image


def test_the_floored_brush_round_trips_exactly() -> None:
    rng = np.random.default_rng(1)
    attention = rng.random((7, 7), dtype=np.float32)
    alpha = attention_alpha(attention, 90, 70, levels=8, floor=0.2)
    back = decode_rle(encode_rle(alpha), 70, 90)
    np.testing.assert_array_equal(back, alpha)
    levels = set(np.unique(back).tolist())
    assert levels <= {0, 36, 73, 109, 146, 182, 219, 255}
    target = alpha_to_map(back, 7)
    assert target.min() >= 0 and target.max() <= 1


def test_the_setting_is_read_and_bad_values_are_refused() -> None:
    assert Settings.from_env({}).brush_floor == 0.0
    assert Settings.from_env({"ABN_BRUSH_FLOOR": "0.15"}).brush_floor == 0.15
    for bad in ("1", "-0.1", "nan", "faint"):
        with pytest.raises(SettingsError, match="ABN_BRUSH_FLOOR"):
            Settings.from_env({"ABN_BRUSH_FLOOR": bad})
