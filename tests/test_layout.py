"""Tools see the layout: every folder installed under `unetpp` has its link in typings/unetpp/,
which pyright and editors read (pyproject's [tool.pyright]) to follow `unetpp.core` to core/."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_typings_link_every_installed_folder():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir = config["tool"]["setuptools"]["package-dir"]
    folders = {
        name.removeprefix("unetpp."): path for name, path in package_dir.items() if "." in name
    }
    links = ROOT / "typings" / "unetpp"
    assert {p.name for p in links.iterdir()} == set(folders)
    for name, path in folders.items():
        assert (links / name).is_symlink()
        assert (links / name).resolve() == (ROOT / path).resolve()
    assert "typings" in config["tool"]["pyright"]["extraPaths"]
