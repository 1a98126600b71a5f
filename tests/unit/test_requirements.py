"""A model project's extra packages (``model.requirements``): exact pins only, never another version of what the
service runs, installed without dependencies (the file is the lock) beside the service's packages, with pip check and
hash checking; the image build's own command, run here offline against wheels made by the test."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from app.project import ProjectError, load_project
from app.requirements import Pin, RequirementsError, parse_pins, service_versions, to_install
from tests.support.projects import app_command, penguins_with_code

PROJECT_DIR = Path(__file__).resolve().parents[2]
# The project's own code needs a package the service does not have: it scales the bill's length by a constant the
# package provides (small, and enough to prove the package is importable where the code trains and serves).
CODE = """
import tinyscale
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.compose import make_column_transformer
from sklearn.impute import SimpleImputer
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder


def make():
    numbers = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g", "year"]
    return make_pipeline(
        make_column_transformer(
            (make_pipeline(SimpleImputer(), FunctionTransformer(tinyscale.scale)), numbers),
            (make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder()), ["island", "sex"]),
        ),
        LogisticRegression(max_iter=3000),
    )
"""


def make_wheel(directory: Path, name: str, version: str, code: str, requires: tuple[str, ...] = ()) -> Path:
    """A pure-Python wheel, written by hand (no build backend, no network)."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    files = {
        f"{name}.py": code,
        f"{info}/METADATA": metadata,
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in {**files, f"{info}/RECORD": record}.items():
            archive.writestr(path, text)
    return wheel


def project_with_requirements(tmp_path: Path, requirements: str) -> Path:
    keys = 'pipeline = "scaled:make"\nrequirements = "requirements.txt"\ntrusted_types = ["tinyscale.scale"]\n'
    directory = penguins_with_code(tmp_path / "penguins", {"scaled.py": CODE, "requirements.txt": requirements}, keys)
    make_wheel(directory / ".wheels", "tinyscale", "1.2.0", "def scale(X):\n    return X / 10.0\n")
    return directory


# -- the rules ------------------------------------------------------------------------------------------------------
def test_exact_pins_with_or_without_hashes_are_read() -> None:
    text = '# extra packages\nLightGBM==4.6.0  # the model\ntzdata==2025.2 ; python_version >= "3.9"\n'
    assert parse_pins(text, "r.txt") == [Pin("lightgbm", "4.6.0", (), 2), Pin("tzdata", "2025.2", (), 3)]
    hashed = "tinyscale==1.2.0 \\\n    --hash=sha256:aa \\\n    --hash=sha256:bb\n"
    assert parse_pins(hashed, "r.txt") == [Pin("tinyscale", "1.2.0", ("sha256:aa", "sha256:bb"), 1)]


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("lightgbm>=4.0", "r.txt line 1: 'lightgbm>=4.0' is not an exact pin: write lightgbm==<version>"),
        ("lightgbm==4.*", "is not an exact pin"),
        ("lightgbm~=4.6", "is not an exact pin"),
        ("lightgbm", "is not an exact pin"),
        ("lightgbm==4.6,<5", "is not an exact pin"),
        ("lightgbm @ https://example.org/l.whl", "is not an exact pin"),
        ("-e .", "only 'name==version' lines"),
        ("-r more.txt", "only 'name==version' lines"),
        ("--extra-index-url https://example.org/simple", "only 'name==version' lines"),
        ("lightgbm==4.6.0 --no-binary :all:", "only 'name==version' lines"),
        ("lightgbm[dask]==4.6.0", "has extras, which install more packages unpinned"),
        ("lightgbm==4.6.0 --hash=md5:abc", "hashes must be sha256"),
        ("a==1 --hash=sha256:aa\nb==2", "some lines have --hash and ['b==2'] do not"),
    ],
)
def test_anything_looser_than_a_pin_is_refused_with_the_reason(line: str, says: str) -> None:
    with pytest.raises(RequirementsError) as refused:
        parse_pins(line, "r.txt")
    assert says in str(refused.value), str(refused.value)


def test_the_services_own_packages_keep_their_versions() -> None:
    service = service_versions()
    assert service["scikit-learn"] == "1.9.1" and "numpy" in service and "packaging" in service
    pins = parse_pins(f"scikit-learn=={service['scikit-learn']}\ntinyscale==1.2.0\n", "r.txt")
    assert [pin.name for pin in to_install(pins, service, "r.txt")] == ["tinyscale"]  # the same version: nothing to do
    with pytest.raises(
        RequirementsError, match=r"\['numpy==1.26.4 \(the service runs 2\.\d+\.\d+\)'\]: the service's own"
    ):
        to_install(parse_pins("numpy==1.26.4\n", "r.txt"), service, "r.txt")


def test_a_project_with_a_loose_requirement_is_refused_before_anything_trains(tmp_path: Path) -> None:
    project = project_with_requirements(tmp_path, "tinyscale>=1\n")
    with pytest.raises(ProjectError, match=r"requirements.txt line 1: 'tinyscale>=1' is not an exact pin"):
        load_project(project)
    (project / "requirements.txt").unlink()
    with pytest.raises(ProjectError, match=r"model.requirements: .*requirements.txt does not exist"):
        load_project(project)


# -- the image build's step, offline ----------------------------------------------------------------------------------
def test_the_build_installs_the_packages_and_the_projects_code_trains_with_them(tmp_path: Path) -> None:
    project = project_with_requirements(tmp_path, "tinyscale==1.2.0\n")
    packages = tmp_path / "packages"
    installed = app_command(project, "requirements", "--into", str(packages))
    assert installed.returncode == 0, installed.stderr
    assert "installed ['tinyscale==1.2.0']" in installed.stdout
    assert (packages / "tinyscale.py").is_file() and (packages / "requirements.txt").read_text() == "tinyscale==1.2.0\n"
    trained = app_command(project, "train", "--into", str(tmp_path / "first-version"), packages=packages)
    assert trained.returncode == 0, trained.stderr
    assert '"version": "v0001"' in trained.stdout


def test_without_the_package_here_check_defers_to_the_build_and_serve_names_it(tmp_path: Path) -> None:
    project = project_with_requirements(tmp_path, "tinyscale==1.2.0\n")
    checked = app_command(project, "check")
    assert checked.returncode == 0, checked.stderr
    assert (
        "scaled.py is not imported here (No module named 'tinyscale'): model.requirements installs it" in checked.stderr
    )
    served = app_command(project, "train", "--into", str(tmp_path / "first-version"))
    assert served.returncode == 2
    assert "importing scaled.py failed: ModuleNotFoundError: No module named 'tinyscale'" in served.stderr


def test_hashes_are_checked_where_the_file_has_them(tmp_path: Path) -> None:
    project = project_with_requirements(tmp_path, "")
    digest = hashlib.sha256((project / ".wheels" / "tinyscale-1.2.0-py3-none-any.whl").read_bytes()).hexdigest()
    (project / "requirements.txt").write_text(f"tinyscale==1.2.0 --hash=sha256:{digest}\n")
    assert app_command(project, "requirements", "--into", str(tmp_path / "good")).returncode == 0
    (project / "requirements.txt").write_text(f"tinyscale==1.2.0 --hash=sha256:{'0' * 64}\n")
    tampered = app_command(project, "requirements", "--into", str(tmp_path / "bad"))
    assert tampered.returncode == 2 and "DO NOT MATCH THE HASHES" in tampered.stderr


def test_a_dependency_the_file_does_not_pin_fails_the_build_naming_it(tmp_path: Path) -> None:
    project = project_with_requirements(tmp_path, "tinyscale==1.2.0\n")
    (project / ".wheels" / "tinyscale-1.2.0-py3-none-any.whl").unlink()
    make_wheel(project / ".wheels", "tinyscale", "1.2.0", "def scale(X):\n    return X\n", requires=("tinyunits>=2",))
    result = app_command(project, "requirements", "--into", str(tmp_path / "packages"))
    assert result.returncode == 2
    assert "tinyscale 1.2.0 requires tinyunits" in result.stderr and "pin each missing package" in result.stderr
