"""Run configs (ml_collections, CLI side) convert to the typed, frozen dataclasses."""

import dataclasses
import importlib.util
import os
from pathlib import Path

import pytest

from dithead_jax import config as cfg
from dithead_jax import sharding

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant", ["testing", "S_2", "B_2", "L_2", "XL_2", "B_4", "S_8"])
def test_dit_run_configs_become_typed_configs(variant):
    run = load("dit").get_config(variant)
    model = cfg.from_dict(cfg.DiTConfig, run.model)
    cfg.from_dict(cfg.DiffusionConfig, run.diffusion)
    cfg.from_dict(cfg.TrainConfig, run.train)
    assert sharding.mesh_config(run.mesh) == cfg.MeshConfig.preset("dp")
    data = cfg.from_dict(cfg.DataConfig, run.data)
    assert data.audio_features == 363
    assert model.audio_window * model.audio_dim == 363
    if variant == "L_2":
        assert (model.depth, model.hidden_size, model.num_heads, model.patch_size) == (
            24,
            1024,
            16,
            2,
        )
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.depth = 3


@pytest.mark.parametrize("variant", ["default", "demo", "testing"])
def test_synthetic_configs_become_typed_configs(variant):
    synthetic = cfg.from_dict(cfg.SyntheticConfig, load("synthetic").get_config(variant))
    assert synthetic.size % 2 == 0 and synthetic.identities >= 2


def test_unknown_fields_and_presets_are_errors():
    with pytest.raises(ValueError, match="unknown field"):
        cfg.from_dict(cfg.DiTConfig, {"hiden_size": 3})
    with pytest.raises(ValueError, match="unknown mesh preset"):
        cfg.MeshConfig.preset("zero3")
    with pytest.raises(ValueError, match="unknown synthetic variant"):
        load("synthetic").get_config("huge")
    assert cfg.from_dict(cfg.DataConfig, {"mask_hull": [1, 2, 33]}).mask_hull == (1, 2, 33)


def test_tuple_fields_can_be_overridden_on_the_command_line(tmp_path):
    """A tuple field (ch_mult) overridden through train.py: the flag parses (lists would
    not), and the missing dataset then gets train.py's one-line error."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "train.py", f"--config={CONFIGS / 'vqgan.py'}:demo",
         f"--workdir={tmp_path / 'run'}", f"--config.data.dir={tmp_path / 'missing'}",
         "--config.model.ch_mult=(1, 2)"],
        cwd=CONFIGS.parent, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"train.py: error: {tmp_path / 'missing'}: not a dataset (no dataset_info.json)"
    )
    values = load("vqgan").get_config("demo")
    assert isinstance(values.model.ch_mult, tuple) and isinstance(values.data.mask_hull, tuple)


def test_config_flag_finds_the_shipped_file_by_name(tmp_path, monkeypatch):
    from dithead_jax.configs import CONFIG_DIR, with_shipped_configs

    monkeypatch.chdir(tmp_path)  # no configs/ here: an installed entry point's situation
    shipped = f"{CONFIG_DIR / 'dit.py'}:testing"
    assert with_shipped_configs(["--config", "dit.py:testing", "--workdir=w"]) == [
        "--config", shipped, "--workdir=w"
    ]  # fmt: skip
    assert with_shipped_configs(["--config=configs/dit.py:testing"]) == [f"--config={shipped}"]
    own = tmp_path / "dit.py"
    own.write_text("")  # a file of the user's own wins over the shipped one
    unchanged = ["--config=dit.py:testing", "--config", "other/vqgan.py", "--config.x=dit.py"]
    assert with_shipped_configs(unchanged) == unchanged
    assert with_shipped_configs(["--config", "nope.py:x"]) == ["--config", "nope.py:x"]


def test_wheel_ships_configs_and_entry_points(tmp_path):
    """The package built as a wheel (no network: this venv's setuptools), installed into a
    folder of its own: it holds the configs and the console scripts, and `dithead-train`
    run from an empty folder reads `--config dit.py:testing` from the installed package."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root, src = CONFIGS.parent, tmp_path / "src"
    shutil.copytree(root / "dithead_jax", src / "dithead_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    pip = [sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", tmp_path]
    subprocess.run(build, check=True, cwd=src, timeout=300)
    (wheel,) = tmp_path.glob("dithead_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"dithead_jax/configs/{n}.py" for n in ("dit", "vqgan", "sync_expert")} <= set(names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for name in ("train", "preprocess", "synthetic", "sample", "export"):
        assert f"dithead-{name} = " in scripts

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [site / "bin/dithead-train", "--config", "dit.py:testing", "--workdir=run",
         "--config.train.num_steps=0"],
        cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Nothing to do: num_steps is 0" in result.stderr
    assert not (elsewhere / "run").exists()
    probe = "import dithead_jax.configs as c; print(c.CONFIG_DIR)"
    where = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, check=True,
                           env={**os.environ, "PYTHONPATH": str(site)},
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    assert where == str(site / "dithead_jax/configs")
