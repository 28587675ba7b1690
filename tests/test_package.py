"""The installable package: the files the code opens ship inside it, the repository's configs/ link, the command
names, and (with a wheel built and installed with --no-deps into a temporary folder) the installed copy run from
another folder, without the repository on the path."""
import configparser
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import ldm
import ldm.sample
import ldm.train
from ldm.cli import sample as sample_cli
from ldm.cli import train as train_cli
from ldm.config import CONFIG_DIR, find_config, load_config
from ldm.models import text_encoder

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(ldm.__file__).resolve().parent


def _package_data_patterns() -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return pyproject["tool"]["setuptools"]["package-data"]["ldm"]


def _data_files() -> set[str]:
    """Every file under ldm/ that is not Python: what the code opens from its own folder."""
    return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}


# ---- fast checks: no build ---------------------------------------------------------------------------------------

def test_package_data_ships_every_file_the_code_opens():
    shipped = {p.relative_to(PACKAGE).as_posix() for pattern in _package_data_patterns() for p in PACKAGE.glob(pattern)}
    assert _data_files() - shipped == set(), "add these to [tool.setuptools.package-data] in pyproject.toml"
    # the files the code names by their place in the package
    needed = [CONFIG_DIR / "sd" / name for name in ("v1-inference.yaml", "v2-inference.yaml", "v2-inference-v.yaml")]
    needed += [train_cli.DEFAULT_BASE, sample_cli.DEFAULT_CKPT, *text_encoder.ARCH_DIR.glob("*.json")]
    for path in needed:
        assert path.is_file() and path.resolve().is_relative_to(PACKAGE), path
        assert path.resolve().relative_to(PACKAGE).as_posix() in shipped, path


def test_repository_configs_is_a_link_to_the_shipped_configs():
    link = ROOT / "configs"
    assert link.is_symlink() and os.readlink(link) == "ldm/configs"  # relative: works in any checkout
    assert link.resolve() == CONFIG_DIR == PACKAGE / "configs"
    for name in ("ldm_txt2img.yaml", "sd/v1-inference.yaml", "demo/shapes_ldm.yaml", "data/webdataset.yaml"):
        assert (link / name).is_file(), name


def test_readme_config_paths_work_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_config("configs/ldm_txt2img.yaml") == CONFIG_DIR / "ldm_txt2img.yaml"
    assert load_config("configs/sd/v1-inference.yaml").model.params.unet_config.params.context_dim == 768
    # the user's own file wins; other missing paths are reported with where the shipped configs are
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "ldm_txt2img.yaml").write_text("model: {target: mine}\n")
    assert load_config("configs/ldm_txt2img.yaml").model.target == "mine"
    for missing in ("configs/nope.yaml", "nope.yaml", str(tmp_path / "configs" / "sd" / "v1-inference.yaml")):
        with pytest.raises(ValueError, match=f"config file not found: .*the shipped configs are in {CONFIG_DIR}"):
            load_config(missing)


def test_program_names(capsys, monkeypatch, tmp_path):
    # the console scripts name themselves
    monkeypatch.setattr(sys, "argv", ["ldm-sample", "--config", str(tmp_path / "nope.yaml")])
    assert ldm.sample.main() == 2
    assert capsys.readouterr().err == f"ldm-sample: error: config not found: {tmp_path / 'nope.yaml'} (check --config)\n"
    monkeypatch.setattr(sys, "argv", ["ldm-train", "--help"])
    with pytest.raises(SystemExit):
        ldm.train.main()
    assert capsys.readouterr().out.startswith("usage: ldm-train ")
    # python -m ldm.sample / ldm.train, and the repository's scripts
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command, usage in (([sys.executable, "-m", "ldm.sample", "--bogus"], "usage: python -m ldm.sample "),
                           ([sys.executable, str(ROOT / "sample.py"), "--bogus"], "usage: sample.py "),
                           ([sys.executable, "-m", "ldm.train", "--bogus"], "usage: python -m ldm.train "),
                           ([sys.executable, "-m", "ldm.serve", "--bogus"], "usage: python -m ldm.serve ")):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
        assert result.returncode == 2 and result.stderr.startswith(usage), (command, result.stderr)
        assert "error: unrecognized arguments: --bogus" in result.stderr


# ---- the wheel -----------------------------------------------------------------------------------------------------

def _pip(*args, cwd):
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300,
                            cwd=cwd, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, target): a wheel built from a copy of what the package needs (so no stale build/ folder of the
    checkout gets in, and nothing is written into it), installed with --no-deps into an empty folder."""
    base = tmp_path_factory.mktemp("package")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "ldm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(base / "dist"), str(src), cwd=base)
    (wheel,) = (base / "dist").glob("ldm-*.whl")
    target = base / "site"
    _pip("install", "--no-deps", "--no-index", "--target", str(target), str(wheel), cwd=base)
    return wheel, target


def _run_installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target)}  # the installed copy only, not the repository
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def test_wheel_holds_the_package_data_and_the_console_scripts(installed):
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {f"ldm/{name}" for name in _data_files()} <= names
    scripts = configparser.ConfigParser()
    scripts.read_string(entry_points)
    assert dict(scripts["console_scripts"]) == {"ldm-sample": "ldm.sample:main", "ldm-train": "ldm.train:main",
                                                "ldm-serve": "ldm.serve.cli:main"}
    assert not any(n.startswith(("tests/", "configs/", "scripts/")) for n in names)


def test_installed_copy_finds_its_configs_from_another_folder(installed, tmp_path):
    _, target = installed
    code = ("import ldm, ldm.config, torch; from ldm.convert import infer_config\n"
            "print(ldm.__file__); print(ldm.config.CONFIG_DIR)\n"
            "sd = {'cond_stage_model.transformer.text_model.embeddings.token_embedding.weight': torch.zeros(1)}\n"
            "print(infer_config(sd).model.params.unet_config.params.context_dim)\n")  # an SD v1 file, no --config
    result = _run_installed(target, tmp_path, "-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    package_file, config_dir, context_dim = result.stdout.split()
    assert Path(package_file).is_relative_to(target) and Path(config_dir) == target / "ldm" / "configs"
    assert (target / "ldm" / "configs" / "sd" / "v1-inference.yaml").is_file() and context_dim == "768"


def test_installed_commands_run_from_another_folder(installed, tmp_path):
    """The console scripts' functions (not on PATH with --target) and python -m ldm.train."""
    _, target = installed
    for name, module in (("ldm-sample", "ldm.sample"), ("ldm-train", "ldm.train")):
        script = f"import sys; from {module} import main; sys.argv = ['{name}', '--help']; sys.exit(main())"
        result = _run_installed(target, tmp_path, "-c", script)
        assert result.returncode == 0 and result.stdout.startswith(f"usage: {name} "), result.stderr[-3000:]
    result = _run_installed(target, tmp_path, "-m", "ldm.train", "--help")
    assert result.returncode == 0 and "configs/demo/shapes_ldm.yaml" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
def test_installed_copy_samples_from_another_folder(installed, tmp_path):
    """python -m ldm.sample with the embedded demo model (about 10 s: torch, the model, two steps)."""
    _, target = installed
    result = _run_installed(target, tmp_path, "-m", "ldm.sample", "--prompt", "a red circle", "--steps", "2",
                            "--n_samples", "1", "--outdir", "out", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "samples" / "00000.png").is_file() and list((tmp_path / "out").glob("grid-*.png"))
