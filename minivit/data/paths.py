"""Where data sets live.

Order: the `MINIVIT_DATA` environment variable if set; else `data/` of the source checkout when minivit runs from
one (a `pyproject.toml` beside the package); else the user cache folder (`$XDG_CACHE_HOME/minivit`, default
`~/.cache/minivit`), so an installed package never writes into site-packages.
"""
import os
from pathlib import Path


def default_data_dir():
    """The folder data sets are read from and written to when no `--data-dir` is given."""
    env = os.environ.get("MINIVIT_DATA")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file() and (repo / "minivit").is_dir():
        return repo / "data"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "minivit"
