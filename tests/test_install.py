"""kernels/ and solvers/ install as qft.kernels / qft.solvers, never as top-level names.

Both folders are namespace packages, so the repository root on sys.path (python -m pytest,
python -c, a REPL started there) never shadows Hugging Face's ``kernels`` (docs/DESIGN.md, Layout).
"""

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Outside the repository: what find_spec says of the two names when our folders cannot be on the path.
_SPECS = "import importlib.util as u; print(*(getattr(u.find_spec(n), 'origin', None) for n in ('kernels', 'solvers')))"


def _top_level_origins(cwd: Path) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _SPECS], cwd=cwd, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_installed_package_maps_subpackages():
    import qft.kernels.dispatch
    import qft.solvers.mckp

    assert Path(qft.kernels.dispatch.__file__).parent == ROOT / "kernels"
    assert Path(qft.solvers.mckp.__file__).parent == ROOT / "solvers"
    for origin in _top_level_origins(Path("/")):  # None (not installed) or someone else's package
        assert not origin.startswith((str(ROOT / "kernels"), str(ROOT / "solvers"))), origin


def test_repository_root_does_not_shadow_hugging_face_kernels():
    """From the root, as a user runs python -c or a REPL there: transformers loads a model class."""
    code = (
        "import kernels, qft, transformers; from transformers import AutoModelForCausalLM, LlamaForCausalLM;"
        "print(getattr(kernels, '__file__', None))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    hf = importlib.util.find_spec("kernels")
    if hf is not None and hf.origin is not None:  # Hugging Face's kernels is installed: it is the one imported
        assert out.stdout.split()[-1] == hf.origin
    assert not out.stdout.split()[-1].startswith(str(ROOT / "kernels"))


def test_python_m_pytest_collects_from_the_root():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_install.py"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]


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
    assert "qft/kernels/dispatch.py" in names and "qft/solvers/mckp.py" in names
    source = {str(p.relative_to(ROOT)) for d in ("qft", "kernels", "solvers") for p in (ROOT / d).rglob("*.py")}
    packaged = {n.replace("qft/kernels/", "kernels/").replace("qft/solvers/", "solvers/") for n in names if n.endswith(".py")}
    assert source <= packaged, f"modules missing from the wheel: {sorted(source - packaged)}"
    assert not any(n.startswith(("kernels/", "solvers/")) for n in names)


def test_wheel_imports(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path)
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r});"
        "import qft, qft.kernels.dispatch, qft.solvers.mckp;"
        f"assert qft.kernels.dispatch.__file__.startswith({str(tmp_path)!r}), qft.kernels.dispatch.__file__;"
        f"assert qft.solvers.mckp.__file__.startswith({str(tmp_path)!r}), qft.solvers.mckp.__file__"
    )
    subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, check=True)
    # nothing of ours became a top-level name in the wheel's folder
    for origin in _top_level_origins(tmp_path):
        assert not origin.startswith((str(tmp_path / "kernels"), str(tmp_path / "solvers"))), origin
