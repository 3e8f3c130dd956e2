"""Package discovery only; every other setting lives in pyproject.toml.

setuptools' declarative `packages.find` cannot also map the top-level `presets/` folder onto
`crosskd_cli.presets`, and a hand-written package list once shipped a wheel without
`crosskd_cli/criteria` (an ImportError for every installed `crosskd teacher`). So: every package
under crosskd_cli/ that is found on disk, plus the presets folder as package data.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[
        *find_namespace_packages(
            include=["crosskd_cli", "crosskd_cli.*"], exclude=["*__pycache__"]
        ),
        "crosskd_cli.presets",
    ],
    package_dir={"crosskd_cli.presets": "presets"},
)
