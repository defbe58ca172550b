"""Build hook: every wheel carries the top-level ``recipes/*.yaml`` as ``autotl/recipes/``.

The built-in recipes have one home in git, ``recipes/`` beside the package, where a source checkout
(editable install) reads them; an installed autotl reads them from inside the package
(``autotl._recipe.recipe_dirs``), so the build copies them there. Everything else about the
project is declared in pyproject.toml.
"""

from __future__ import annotations

import glob
import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.errors import FileError

RECIPES_SOURCE = "recipes"
RECIPES_IN_PACKAGE = os.path.join("autotl", "recipes")
RECIPE_PATTERNS = ("*.yaml", "*.yml")  # autotl._recipe.RECIPE_SUFFIXES


class BuildPyWithRecipes(build_py):
    """``build_py`` that also copies the built-in recipes into the built package."""

    def _recipe_sources(self) -> list[str]:
        return sorted(f for pattern in RECIPE_PATTERNS for f in glob.glob(os.path.join(RECIPES_SOURCE, pattern)))

    def _recipe_target(self, source: str) -> str:
        return os.path.join(self.build_lib, RECIPES_IN_PACKAGE, os.path.basename(source))

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's recipes/ in place
            return
        sources = self._recipe_sources()
        if not sources:  # e.g. an sdist made without MANIFEST.in: fail the build, not `autotl fit` later
            raise FileError(f"no {' or '.join(RECIPE_PATTERNS)} files in {os.path.abspath(RECIPES_SOURCE)}: "
                            "the package would have no built-in recipes")
        target_dir = os.path.join(self.build_lib, RECIPES_IN_PACKAGE)
        self.mkpath(target_dir)
        wanted = {self._recipe_target(s) for s in sources}
        for stale in glob.glob(os.path.join(target_dir, "*")):  # a recipe deleted since the last build
            if stale not in wanted and os.path.isfile(stale):
                os.remove(stale)
        for source in sources:
            self.copy_file(source, self._recipe_target(source))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:
            return outputs
        return outputs + [self._recipe_target(s) for s in self._recipe_sources()]


setup(cmdclass={"build_py": BuildPyWithRecipes})
