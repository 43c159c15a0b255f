"""Where newtonlm finds its Hydra configs, in a source checkout and in an installed wheel alike.

``newtonlm/configs`` is a link to the top-level ``configs/`` in the source tree (an editable install
reads the checkout's files, so edits take effect at once); a built wheel holds copies of the files
there (``[tool.setuptools.package-data]`` in pyproject.toml).
"""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
