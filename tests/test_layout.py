"""dvc.yaml knows exactly the code each stage runs, and the paths stage modules use (from
``transfer.layout``) are the ones dvc.yaml declares for their stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from transfer import layout

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "transfer")  # entry points, and the library they call


def _module_file(name: str) -> Path:
    return ROOT / (name.replace(".", "/") + ".py")


def _imported_modules(path: Path) -> set[str]:
    """Every ``stages.*`` module ``path`` imports, at the top or inside functions, but not the
    imports under ``if TYPE_CHECKING:`` (they never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from transfer import layout` imports the module transfer.layout
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found
            if name.startswith(tuple(f"{p}." for p in PACKAGES)) and _module_file(name).is_file()}


def modules_run_by(module: str) -> set[str]:
    """The ``stages`` modules that ``python -m <module>`` can run: the transitive imports."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_imported_modules(_module_file(name)) - seen)
    return seen


def _dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def _entry_path(entry) -> str:
    return entry if isinstance(entry, str) else next(iter(entry))


def _declared(stage: dict, *kinds: str) -> set[str]:
    return {_entry_path(entry) for kind in kinds for entry in stage.get(kind, [])}


STAGES = sorted(_dvc_stages())


@pytest.mark.parametrize("package", PACKAGES)
def test_package_init_runs_nothing(package):
    # Stage deps list module files; an __init__ with code would be code no stage lists.
    assert (ROOT / package / "__init__.py").read_text().strip() == ""


@pytest.mark.parametrize("name", STAGES)
def test_stage_depends_on_exactly_the_code_it_runs(name):
    stage = _dvc_stages()[name]
    module = stage["cmd"].split("-m ")[1].split()[0]
    runs = {_module_file(m).relative_to(ROOT).as_posix() for m in modules_run_by(module)}
    listed = {path for path in _declared(stage, "deps") if path.endswith(".py")}
    assert not runs - listed, f"dvc.yaml stage {name} runs but does not depend on these"
    assert not listed - runs, f"dvc.yaml stage {name} depends on code it never runs"


def test_import_closure_sees_lazy_imports(tmp_path, monkeypatch):
    # A lazy import inside a function counts: it runs when the function does.
    assert "transfer.training" in modules_run_by("stages.finetune")
    assert "transfer.network" in modules_run_by("stages.finetune")
    assert "stages.predict" not in modules_run_by("stages.evaluate")


def _layout_names_used(module: str) -> set[str]:
    """The ``transfer.layout`` names a module imports (``from transfer.layout import X``) or reads
    as ``layout.X``."""
    tree = ast.parse(_module_file(module).read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "transfer.layout":
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "layout":
            names.add(node.attr)
    return names


def _covers(declared: set[str], path: Path) -> bool:
    """``path`` is declared, lies inside a declared directory, or is a directory of which the
    stage declares the files it uses."""
    return any(path == Path(d) or Path(d) in path.parents or path in Path(d).parents
               for d in declared)


@pytest.mark.parametrize("name", STAGES)
def test_stage_declares_every_layout_path_it_uses(name):
    stage = _dvc_stages()[name]
    module = stage["cmd"].split("-m ")[1].split()[0]
    declared = _declared(stage, "deps", "outs", "metrics", "plots")
    undeclared = []
    for used in sorted(_layout_names_used(module)):
        value = getattr(layout, used)
        if not isinstance(value, Path) or value in (layout.PARAMS, layout.CHECKPOINT_DIR,
                                                    layout.ONNX_CACHE, layout.EMBEDDING_STORE,
                                                    layout.KEYPOINT_CACHE, layout.RAW_DIR,
                                                    layout.TORCHVISION_ROOT):
            continue  # params are declared per key; checkpoints, ONNX graphs, stored
            # embeddings and keypoint counts live outside DVC on purpose
        if not _covers(declared, value):
            undeclared.append(f"{used}={value}")
    assert not undeclared, f"stage {name} uses paths dvc.yaml does not declare for it"


def test_every_stage_output_path_comes_from_the_layout():
    paths = {value for value in vars(layout).values() if isinstance(value, Path)}
    for name, stage in _dvc_stages().items():
        for out in _declared(stage, "outs", "metrics", "plots"):
            assert _covers({p.as_posix() for p in paths}, Path(out)), (name, out)


def test_finetune_curve_plots_are_the_curves_the_stage_writes():
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["plots"]
    plotted = {file for plot in plots for spec in plot.values() for file in spec["y"]}
    written = {layout.curve_file(c).as_posix()
               for c in layout.CURVES} | {layout.FINETUNE_LR_RANGE.as_posix()}
    assert plotted == written
    templates = {spec["template"] for plot in plots for spec in plot.values()}
    assert all((ROOT / ".dvc" / "plots" / f"{t}.json").is_file() for t in templates - {"linear"})
