"""A project's Debian packages (``model.system_packages``, issue 23: "lightgbm works on the VM and locally"): names
only, listed by the image build's packages step for its system stage (app/Dockerfile.project), and a project whose
code cannot load a system library fails naming the library and this key. The image build itself, apt resolving
against the model image and LightGBM training with Debian's libgomp1, runs in the local-stack project test
(tests/stack/test_stack.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.project import SYSTEM_PACKAGES_LIST, ProjectError, load_project
from tests.support.projects import app_command, penguins_with_code

# The project's code loads a shared library this machine does not have, as lightgbm's does libgomp.so.1.
LOADS_A_LIBRARY = """
import ctypes

ctypes.CDLL("libmlapi-test-absent.so.3")


def make():
    raise AssertionError("never reached: the import fails")
"""


@pytest.mark.parametrize(
    ("names", "says"),
    [
        ('["libgomp1=12.2.0-14"]', "'libgomp1=12.2.0-14': a name without a version"),
        ('["libgomp1; rm -rf /"]', "is not a Debian package name (lower-case letters, digits, + - ., such as"),
        ('["LibGomp1"]', "is not a Debian package name"),
        ('["-o"]', "is not a Debian package name"),
        ('"libgomp1"', "model.system_packages"),
    ],
)
def test_a_system_package_that_is_not_a_bare_debian_name_is_refused(tmp_path: Path, names: str, says: str) -> None:
    project = penguins_with_code(tmp_path / "penguins", {}, f"system_packages = {names}\n")
    with pytest.raises(ProjectError, match=r"mlapi.toml: model.system_packages") as refused:
        load_project(project)
    assert says in str(refused.value)


def test_the_packages_step_lists_them_for_the_system_stage(tmp_path: Path) -> None:
    keys = 'system_packages = ["libgomp1", "libstdc++6"]\n'
    project = penguins_with_code(tmp_path / "penguins", {}, keys)
    into = tmp_path / "packages"
    result = app_command(project, "requirements", "--into", str(into))
    assert result.returncode == 0, result.stderr
    assert (into / SYSTEM_PACKAGES_LIST).read_text() == "libgomp1\nlibstdc++6\n"
    bare = app_command(penguins_with_code(tmp_path / "plain", {}, ""), "requirements", "--into", str(tmp_path / "p2"))
    assert bare.returncode == 0 and (tmp_path / "p2" / SYSTEM_PACKAGES_LIST).read_text() == ""


def test_code_that_cannot_load_a_system_library_names_it_and_the_key(tmp_path: Path) -> None:
    project = penguins_with_code(tmp_path / "penguins", {"native.py": LOADS_A_LIBRARY}, 'pipeline = "native:make"\n')
    result = app_command(project, "check")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (
        "model.pipeline: importing native.py failed: OSError: libmlapi-test-absent.so.3: cannot open shared object "
        "file: No such file or directory (a system library a package needs: add the Debian package that ships "
        "libmlapi-test-absent.so.3 to model.system_packages" in result.stderr
    )
