"""newtonlm installed from a wheel (not the source checkout): the Hydra configs travel inside the
package, so the entry points work from any directory."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from helpers import REPO


@pytest.mark.slow
def test_wheel_ships_configs_and_the_trainer_composes_from_it(tmp_path):
    # build from a copy of the source tree (setuptools leaves build/ behind in the tree it builds)
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", ".cache", "*.egg-info", "__pycache__", ".*_cache"))
    assert (src / "newtonlm" / "configs").is_symlink()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = (tmp_path / "dist").glob("newtonlm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n.removeprefix("newtonlm/configs/") for n in names if n.startswith("newtonlm/configs/"))
    in_repo = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml"))
    assert shipped == in_repo and "newtonlm/kernels/csrc/cpu_kernels.c" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = subprocess.run(
        [sys.executable, "-c", "import newtonlm.paths as p, newtonlm.models as m; "
         "print(p.CONFIG_DIR); print(len(m.preset_names()))"],
        cwd=work, env=env, check=True, capture_output=True, text=True).stdout.split()
    presets = len(list((REPO / "configs" / "model").glob("*.yaml")))
    assert probe == [str(site / "newtonlm" / "configs"), str(presets)]
    job = subprocess.run([sys.executable, "-m", "newtonlm.training.train", "--cfg", "job",
                          "model=paralstm_demo", "train.max_steps=7"],
                         cwd=work, env=env, capture_output=True, text=True)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "arch: paralstm" in job.stdout and "max_steps: 7" in job.stdout
