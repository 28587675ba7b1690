import pytest
from omegaconf import OmegaConf

from ldm.config import ConfigError, check_config, instantiate_from_config, load_config


class Inner:
    def __init__(self, width: int = 4):
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        self.width = width


class Outer:
    def __init__(self, inner_config, scale: float = 1.0):
        self.inner = instantiate_from_config(inner_config)
        self.scale = scale


def _cfg(**inner):
    return OmegaConf.create({"model": {"target": f"{__name__}.Outer", "params": {
        "scale": 2.0, "inner_config": {"target": f"{__name__}.Inner", "params": inner}}}})


def test_load_merge_and_overrides(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("model:\n  params:\n    x: 1\n    y: 2\n")
    b.write_text("model:\n  params:\n    y: 3\n")
    cfg = load_config(a, b, overrides=["model.params.z=4"])
    assert cfg.model.params == {"x": 1, "y": 3, "z": 4}


def test_instantiate_nested():
    obj = instantiate_from_config(_cfg(width=8).model)
    assert obj.inner.width == 8 and obj.scale == 2.0


def test_unknown_target_names_path():
    cfg = _cfg()
    cfg.model.params.inner_config.target = f"{__name__}.Nope"
    with pytest.raises(ConfigError, match=r"model\.params\.inner_config\.target"):
        check_config(cfg.model)


def test_unknown_param_names_path():
    cfg = _cfg(widht=3)
    with pytest.raises(ConfigError, match=r"model\.params\.inner_config\.params\.widht: unknown parameter"):
        check_config(cfg.model)
    with pytest.raises(ConfigError, match=r"model\.params\.inner_config\.params\.widht"):
        instantiate_from_config(cfg.model)


def test_bad_value_names_nested_path():
    with pytest.raises(ConfigError, match=r"^model\.params\.inner_config: cannot build .*width must be positive"):
        instantiate_from_config(_cfg(width=-1).model)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "a.yaml").write_text("a: 1\n")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(tmp_path / "a.yaml", overrides=["oops"])


def test_check_value_judges_config_values_against_annotations():
    import os
    import typing

    from ldm.config import check_value

    ok = [(3, int), (3, float), (0.5, float | None), (None, typing.Optional[int]), ([1, 2], typing.Sequence[int]),
          ((1, 2), tuple[int, int]), ({"a": 1}, dict[str, int]), ("x", str | os.PathLike), ("32", typing.Literal["32"]),
          (True, bool), ([1, 2], typing.Union[int, typing.Sequence[int]]), ({"anything": 1}, typing.Any),
          ("a string", typing.Union[str, os.PathLike]), (object(), pytest.Session)]  # classes of code: not judged
    for value, ann in ok:
        check_value(value, ann, "k")
    bad = [("abc", int), (True, int), (2.5, int), ("fast", float), (True, float), ("abc", typing.Sequence[int]),
           ([1, "x"], list[int]), ((1, 2, 3), tuple[int, int]), (32, typing.Literal["32"]), ("x", bool),
           (3, dict), ({"a": "b"}, dict[str, int]), (None, int)]
    for value, ann in bad:
        with pytest.raises(ConfigError, match=r"^k: .* is not valid here; expected "):
            check_value(value, ann, "k")
