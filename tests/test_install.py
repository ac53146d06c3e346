"""kernels/ and solvers/ install as qft.kernels / qft.solvers, never as top-level names."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_maps_subpackages():
    import qft.kernels
    import qft.solvers

    assert Path(qft.kernels.__file__).parent == ROOT / "kernels"
    assert Path(qft.solvers.__file__).parent == ROOT / "solvers"
    code = "import importlib.util as u; print(u.find_spec('kernels'), u.find_spec('solvers'))"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "None"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # build from a clean copy: a build/ folder left in the checkout would leak stale modules into the wheel
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("qft", "kernels", "solvers"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(out), str(src)],
        check=True, capture_output=True, text=True,
    )
    # the project metadata is current: no setuptools deprecation banner on every install
    assert "Deprecat" not in build.stdout + build.stderr, (build.stdout + build.stderr)[-3000:]
    return next(out.glob("qft-*.whl"))


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "qft/kernels/__init__.py" in names and "qft/solvers/__init__.py" in names
    source = {str(p.relative_to(ROOT)) for d in ("qft", "kernels", "solvers") for p in (ROOT / d).rglob("*.py")}
    packaged = {n.replace("qft/kernels/", "kernels/").replace("qft/solvers/", "solvers/") for n in names if n.endswith(".py")}
    assert source <= packaged, f"modules missing from the wheel: {sorted(source - packaged)}"
    assert not any(n.startswith(("kernels/", "solvers/")) for n in names)


def test_wheel_imports(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path)
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r});"
        "import importlib.util as u, qft, qft.kernels, qft.solvers;"
        f"assert qft.kernels.__file__.startswith({str(tmp_path)!r}), qft.kernels.__file__;"
        "assert u.find_spec('kernels') is None and u.find_spec('solvers') is None"
    )
    subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, check=True)
