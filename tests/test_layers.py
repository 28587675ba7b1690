"""Imports only go downwards (DESIGN.md's layer list): every import in ldm/, at any depth of a module, is checked."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ldm"

# bottom to top; a module may import its own layer and the layers below it
LAYERS = [
    {"ldm", "ldm.config", "ldm.configs", "ldm.io", "ldm.metrics", "ldm.ema", "ldm.assets"},  # I/O, configs
    {"ldm.diffusion"},                          # pure math, no parameters
    {"ldm.models"},                             # plain nn.Modules
    {"ldm.model"},                              # LatentDiffusion: the models and the diffusion schedule together
    {"ldm.convert"},                            # layouts, architecture inference, building and loading models
    {"ldm.accel"},                              # the acceleration pass
    {"ldm.adapters"},                           # LoRA and friends, on plain layers
    {"ldm.data"},                               # LightningDataModules
    {"ldm.training"},                           # LightningModules, callbacks, losses
    {"ldm.pipeline"},                           # prompt -> images
    {"ldm.cli", "ldm.serve", "ldm.eval", "ldm.sample", "ldm.train", "ldm.__main__", "ldm.recipes"},  # commands
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
# further rules inside the order: the models know nothing of diffusion (DESIGN.md)
FORBIDDEN = {"ldm.models": {"ldm.diffusion"}}


def _group(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported ldm module) for every import statement of the file, relative ones resolved."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            # "from ldm import pipeline" imports the module ldm.pipeline
            out += [(node.lineno, f"{base}.{alias.name}" if base == "ldm" else base) for alias in node.names]
    return [(line, name) for line, name in out if name == "ldm" or name.startswith("ldm.")]


def _files():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_ldm_module_has_a_layer():
    unknown = sorted({_group(_module_name(f)) for f in _files()} - set(RANK))
    assert not unknown, f"add {unknown} to LAYERS in tests/test_layers.py (and to DESIGN.md's layer list)"


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_only_go_down(path):
    source = _group(_module_name(path))
    if source not in RANK:
        pytest.skip("reported by test_every_ldm_module_has_a_layer")
    upward = [f"line {line}: {name}" for line, name in _imports(path)
              if RANK.get(_group(name), len(LAYERS)) > RANK[source] or _group(name) in FORBIDDEN.get(source, ())]
    assert not upward, f"{path.name} ({source}) imports from a layer above it or one it must not know: {upward}"


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a models file that imports the converter is caught, a relative import resolved."""
    fake = PACKAGE / "models" / "unet.py"
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: (
        "from ldm.io import read_state_dict\nfrom ..convert import load_model\n"
        "def f():\n    from ldm import pipeline\n"))
    names = [name for _, name in _imports(fake)]
    assert names == ["ldm.io", "ldm.convert", "ldm.pipeline"]
    with pytest.raises(AssertionError, match="ldm.convert.*ldm.pipeline"):
        test_imports_only_go_down(fake)
