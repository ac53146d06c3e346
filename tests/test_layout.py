"""The rooms of qft/ and the one direction of their imports (docs/DESIGN.md, Layout)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lowest first: a room imports only the rooms before it (module-level or inside functions)
ORDER = ["kernels", "solvers", "quant", "nn", "files", "training", "methods", "prepare", "exports", "cli"]


def _room(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] in ("kernels", "solvers"):
        return parts[0]
    return parts[1]


def _imported_rooms(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "qft" and len(parts) > 1:
                rooms.add(parts[1])
    return rooms


def test_every_module_lives_in_a_room():
    loose = [p.name for p in (ROOT / "qft").glob("*.py") if p.name not in ("__init__.py", "__main__.py", "cli.py")]
    assert not loose, f"modules outside the rooms: {loose}"


def test_imports_point_one_way():
    wrong = []
    for path in [*(ROOT / "qft").rglob("*.py"), *(ROOT / "kernels").glob("*.py"), *(ROOT / "solvers").glob("*.py")]:
        room = _room(path)
        if room in ("__init__", "__main__"):
            continue
        # kernels read the packing layout (quant.packing), the one exception: quant's formats call the kernels
        allowed = set(ORDER[: ORDER.index(room)]) | {room} | ({"quant"} if room == "kernels" else set())
        wrong += [f"{path.relative_to(ROOT)} imports qft.{r}" for r in sorted(_imported_rooms(path) - allowed)]
    assert not wrong, wrong
