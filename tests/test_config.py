"""MiTConfig: every field validated by type and range, naming the field; JSON round trip."""

from __future__ import annotations

import math

import pytest

from mit import MiTConfig


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"layers": [1.7]}, "layers: expected None or a non-empty list of integers each >= 0, got [1.7]"),
        ({"layers": "12"}, "layers: expected None or a non-empty list of integers each >= 0, got '12'"),
        ({"layers": []}, "layers: expected None or a non-empty list of integers each >= 0, got []"),
        ({"layers": [-1, 2]}, "layers: expected None or a non-empty list of integers each >= 0, got [-1, 2]"),
        ({"layers": [True]}, "layers: expected None or a non-empty list of integers each >= 0, got [True]"),
        ({"modality_dim": True}, "modality_dim: expected an integer >= 1, got True"),
        ({"modality_dim": 0}, "modality_dim: expected an integer >= 1, got 0"),
        ({"modality_dim": 8.0}, "modality_dim: expected an integer >= 1, got 8.0"),
        ({"head_logit_init": math.nan}, "head_logit_init: expected a finite number, got nan"),
        ({"head_logit_init": math.inf}, "head_logit_init: expected a finite number, got inf"),
        ({"infuse_kv": "false"}, "infuse_kv: expected a bool (true or false), got 'false'"),
        ({"head_rescale": 1}, "head_rescale: expected a bool (true or false), got 1"),
        ({"backend": "cuda"}, "backend: expected one of ['auto', 'reference', 'triton', 'cpu', 'sdpa'], got 'cuda'"),
        ({"infuse_kv": False, "infuse_ffn": False}, "infuse_kv, infuse_ffn: at least one must be True"),
    ],
)
def test_bad_fields_are_refused_naming_the_field(settings, message):
    with pytest.raises(ValueError) as error:
        MiTConfig(**{"modality_dim": 8, **settings})
    assert str(error.value).startswith(message), str(error.value)


def test_normalisation_and_round_trip():
    config = MiTConfig(modality_dim=8, layers=(5, 1, 5), head_logit_init=2)
    assert config.layers == [1, 5] and isinstance(config.head_logit_init, float)
    assert MiTConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match=r"MiTConfig: unknown setting 'rank'"):
        MiTConfig.from_dict({"modality_dim": 8, "rank": 4})
    with pytest.raises(ValueError, match=r"MiTConfig: missing required setting 'modality_dim'"):
        MiTConfig.from_dict({"layers": [1]})
