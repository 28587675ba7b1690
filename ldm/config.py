"""Configs: OmegaConf YAML with the ``target:`` / ``params:`` schema of the original latent-diffusion code.

    cfg = load_config("configs/demo/shapes_ldm.yaml", overrides=["model.params.base_learning_rate=1e-4"])
    model = instantiate_from_config(cfg.model)

Every error names the config path of the node that is wrong (``model.params.unet_config.params.channel_mult``)
and what to do about it, and is raised before any work starts: :func:`check_config` walks the whole tree,
imports every target and binds its params against the constructor's signature.
"""
from __future__ import annotations

import collections.abc
import contextvars
import importlib
import inspect
import os
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "CONFIG_DIR",
    "ASSET_DIR",
    "ConfigError",
    "load_config",
    "find_config",
    "instantiate_from_config",
    "check_config",
    "check_value",
    "param_types",
    "get_obj_from_str",
    "to_plain",
]


# The configs the code needs (the SD architectures, the embedded default), shipped inside the package; the
# repository's top-level configs/ is a link to this folder.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


# Files shipped inside the package (the demo model), named in configs as ``${asset:demo/shapes.safetensors}`` so
# that a shipped config finds them from any folder once the package is installed.
ASSET_DIR = Path(__file__).resolve().parent / "assets"


def _asset(name: str) -> str:
    path = (ASSET_DIR / name).resolve()
    if ASSET_DIR not in path.parents:
        raise ConfigError(f"${{asset:{name}}} is outside {ASSET_DIR}; name a file under it")
    return str(path)


with warnings.catch_warnings():  # omegaconf 2.4 renames it register_resolver; 2.3 has only this name
    warnings.simplefilter("ignore", UserWarning)
    OmegaConf.register_new_resolver("asset", _asset, replace=True)


class ConfigError(ValueError):
    """A config problem: the message is one line that names the key and the fix."""


def load_config(*paths: str | os.PathLike, overrides: Iterable[str] = ()) -> DictConfig:
    """Merge YAML files left to right, then ``key=value`` dotlist overrides."""
    if not paths:
        raise ConfigError("no config given: pass at least one YAML file (e.g. configs/demo/shapes_ldm.yaml)")
    parts = []
    for p in map(find_config, paths):
        if not p.is_file():
            raise ConfigError(f"config file not found: {p} (check the path given to --base/--config; "
                              f"the shipped configs are in {CONFIG_DIR})")
        try:
            parts.append(OmegaConf.load(p))
        except Exception as e:  # yaml errors are long; keep the first line
            raise ConfigError(f"cannot parse config {p}: {str(e).splitlines()[0]}") from e
    overrides = list(overrides)
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key=value (e.g. lightning.trainer.max_steps=20)")
    try:
        parts.append(OmegaConf.from_dotlist(overrides))
        cfg = OmegaConf.merge(*parts)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot merge configs/overrides: {str(e).splitlines()[0]}") from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config {paths[0]} must be a mapping at the top level")
    return cfg


def find_config(path: str | os.PathLike) -> Path:
    """``path``, or the shipped copy of a relative ``configs/...`` path that is not a file here (so the README's
    ``--base configs/ldm_txt2img.yaml`` works from any folder once the package is installed)."""
    path = Path(path)
    if path.is_file() or path.is_absolute() or path.parts[:1] != ("configs",):
        return path
    shipped = CONFIG_DIR.joinpath(*path.parts[1:])
    return shipped if shipped.is_file() else path


def to_plain(node: Any) -> Any:
    """Resolve a config node to plain Python containers (what goes into checkpoints and JSON)."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    if isinstance(node, Mapping):
        return {k: to_plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [to_plain(v) for v in node]
    return node


# id(plain dict) -> config path, for nested nodes handed to constructors as plain dicts while they build
_PATHS: contextvars.ContextVar[dict] = contextvars.ContextVar("ldm_config_paths", default={})


def _node_path(node: Any, path: str | None) -> str:
    if path:
        return path
    known = _PATHS.get().get(id(node))
    if known:
        return known
    if isinstance(node, DictConfig):
        try:
            key = node._get_full_key(None)
            if key:
                return str(key)
        except Exception:
            pass
    return "<config>"


def get_obj_from_str(target: str, path: str = "<config>") -> Any:
    if not isinstance(target, str) or "." not in target:
        raise ConfigError(f"{path}.target: {target!r} is not a dotted import path like 'ldm.models.unet.UNetModel'")
    module_name, attr = target.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{path}.target: cannot import module '{module_name}' ({e}); check the spelling") from e
    if not hasattr(module, attr):
        raise ConfigError(f"{path}.target: '{module_name}' has no '{attr}'; check the class name")
    return getattr(module, attr)


def _is_target_node(value: Any) -> bool:
    return isinstance(value, (Mapping, DictConfig)) and "target" in value


def _accepted(fn: Any) -> tuple[set[str], bool]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return set(), True
    names, var_kw = set(), False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.add(p.name)
    return names, var_kw


# ---- values against the constructors' type annotations ----------------------------------------------------------
_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.Iterable, collections.abc.Collection)
_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)
_BASIC = {int: "an int", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def param_types(fn: Any) -> dict[str, Any]:
    """The type annotations of ``fn``'s parameters (a class: of its ``__init__``); an annotation that cannot be
    resolved is left out (and its value is not checked)."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        return typing.get_type_hints(target)
    except Exception:  # a name only imported for type checkers: resolve what can be, one by one
        hints = {}
        namespace = getattr(inspect.getmodule(target), "__dict__", {})
        for name, ann in getattr(target, "__annotations__", {}).items():
            try:
                hints[name] = eval(ann, namespace) if isinstance(ann, str) else ann  # noqa: S307 (the code's own)
            except Exception:
                pass
        return hints


def _matches(value: Any, ann: Any) -> bool | None:
    """Whether a plain config value fits the annotation; None where the annotation is beyond what a config
    value can be judged against (a class of the code, a callable, a type variable)."""
    if ann is Any or ann is inspect.Parameter.empty:
        return None
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_matches(value, a) for a in args]
        return True if True in verdicts else (None if None in verdicts else False)
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if ann in _BASIC:
        if ann is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if ann is int:
            return isinstance(value, int) and not isinstance(value, bool)
        return isinstance(value, ann)
    base = origin or ann
    if base in _MAPPINGS:
        if not isinstance(value, Mapping):
            return False
        if len(args) == 2:
            verdicts = [_matches(k, args[0]) for k in value] + [_matches(v, args[1]) for v in value.values()]
            return False not in verdicts
        return True
    if base in _SEQUENCES:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            return False  # a string is not a list of anything here ("abc" for channel_mult)
        if base is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                return False
            verdicts = [_matches(v, a) for v, a in zip(value, args)]
        else:
            verdicts = [_matches(v, args[0]) for v in value] if args else []
        return False not in verdicts
    if ann in (os.PathLike, Path):
        return isinstance(value, str)
    return None


def _describe(ann: Any) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType) or origin is typing.Literal:
        literals = _literals(ann)
        others = [_describe(a) for a in args if typing.get_origin(a) is not typing.Literal] if origin else []
        if literals:
            others.insert(0, "one of " + ", ".join(repr(a) for a in literals))
        return " or ".join(dict.fromkeys(others))
    if ann in _BASIC:
        return _BASIC[ann]
    base = origin or ann
    if base in _MAPPINGS:
        return "a mapping"
    if base in _SEQUENCES:
        if base is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
        return f"a list of {_plural(args[0])}" if args else "a list"
    if ann in (os.PathLike, Path):
        return "a path"
    return getattr(ann, "__name__", str(ann))


def _literals(ann: Any) -> list:
    """The values of the ``Literal`` s in ``ann`` (a Literal or a union with Literals in it)."""
    if typing.get_origin(ann) is typing.Literal:
        return list(typing.get_args(ann))
    return [v for a in typing.get_args(ann) if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)]


def _plural(ann: Any) -> str:
    text = _describe(ann)
    return {"an int": "ints", "a number": "numbers", "a string": "strings", "true or false": "booleans"}.get(text, text)


def check_value(value: Any, annotation: Any, path: str) -> None:
    """Raise a one-line ConfigError naming ``path`` unless the config value fits the parameter's annotation
    (``int``, ``float``, ``bool``, ``str``, ``None``, ``Literal``, unions, sequences and mappings of them; other
    annotations are not judged)."""
    try:
        plain = to_plain(value)
    except OmegaConfBaseException as e:  # e.g. an interpolation that does not resolve
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from e
    if _matches(plain, annotation) is False:
        raise ConfigError(f"{path}: {plain!r} is not valid here; expected {_describe(annotation)}")


def check_config(node: Any, path: str | None = None) -> None:
    """Import every target in the tree and check its params against the constructor; raise ConfigError."""
    path = _node_path(node, path)
    if not _is_target_node(node):
        raise ConfigError(f"{path}: expected a node with 'target:' (and optional 'params:')")
    obj = get_obj_from_str(node["target"], path)
    params = node.get("params", None) or {}
    if not isinstance(params, (Mapping, DictConfig)):
        raise ConfigError(f"{path}.params: must be a mapping, got {type(params).__name__}")
    names, var_kw = _accepted(obj)
    required = set()
    try:
        for p in inspect.signature(obj).parameters.values():
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                required.add(p.name)
    except (TypeError, ValueError):
        pass
    for key in params:
        if not var_kw and names and key not in names:
            close = sorted(names)
            raise ConfigError(
                f"{path}.params.{key}: unknown parameter for {node['target']} (accepted: {', '.join(close)})")
    missing = sorted(required - set(params))
    if missing and names:
        raise ConfigError(f"{path}.params: missing required parameter(s) {', '.join(missing)} for {node['target']}")
    hints = param_types(obj)
    for key in params:
        if isinstance(params, DictConfig) and OmegaConf.is_missing(params, key):
            continue  # ??? : the caller reports missing values
        value = params[key]
        if key in hints and not _is_target_node(value):
            check_value(value, hints[key], f"{path}.params.{key}")
    for key, value in params.items():
        if _is_target_node(value):
            check_config(value, f"{path}.params.{key}")
        elif isinstance(value, (list, ListConfig)):
            for i, item in enumerate(value):
                if _is_target_node(item):
                    check_config(item, f"{path}.params.{key}.{i}")


def instantiate_from_config(node: Any, path: str | None = None, **extra: Any) -> Any:
    """Build ``target(**params, **extra)``; errors name the node's config path."""
    path = _node_path(node, path)
    if not _is_target_node(node):
        if node in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise ConfigError(f"{path}: expected a node with 'target:' (and optional 'params:')")
    obj = get_obj_from_str(node["target"], path)
    params = node.get("params", None) or {}
    if isinstance(params, DictConfig):
        params = OmegaConf.to_container(params, resolve=True)
    params = dict(params, **extra)
    names, var_kw = _accepted(obj)
    if names and not var_kw:
        unknown = [k for k in params if k not in names]
        if unknown:
            raise ConfigError(
                f"{path}.params.{unknown[0]}: unknown parameter for {node['target']} "
                f"(accepted: {', '.join(sorted(names))})")
    paths = dict(_PATHS.get())
    for key, value in params.items():
        if _is_target_node(value):
            paths[id(value)] = f"{path}.params.{key}"
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if _is_target_node(item):
                    paths[id(item)] = f"{path}.params.{key}.{i}"
    token = _PATHS.set(paths)
    try:
        return obj(**params)
    except ConfigError:
        raise
    except (TypeError, ValueError, AssertionError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{path}: cannot build {node['target']}: {msg}") from e
    finally:
        _PATHS.reset(token)
