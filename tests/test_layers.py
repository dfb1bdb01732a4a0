"""The package's import arrows run one way: a module imports (at the top or inside a function) only from its
own layer or lower ones, so the engine names no method and the methods never reach up into the engine."""
import ast
from pathlib import Path

from conftest import ROOT

# lowest first; a module not listed takes its package's layer
LAYERS = [
    {"atomic", "engine_errors", "registry", "options", "stream", "metrics", "feature_cache"},
    {"config", "memory", "heads", "data", "backbones"},
    {"approaches", "optim"},
    {"evaluation", "rundir", "reporting", "devices", "flags", "compat", "trackers"},
    {"engine"},
    {"hub", "cli", "__init__", "evaluate_modules"},
]


def layer(module: str) -> int:
    parts = module.split(".")[1:]  # drop "mmcl"
    for name in (".".join(parts), parts[0] if parts else "__init__"):
        for i, names in enumerate(LAYERS):
            if name in names:
                return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def mmcl_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmcl"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mmcl")}
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and str(arg.value).startswith("mmcl"):
                found.add(arg.value)
    return found


def test_no_module_imports_from_a_higher_layer():
    offenders = []
    for path in sorted((ROOT / "mmcl").rglob("*.py")):
        module = "mmcl." + ".".join(path.relative_to(ROOT / "mmcl").with_suffix("").parts)
        module = module.removesuffix(".__init__") if module != "mmcl.__init__" else "mmcl.__init__"
        own = layer(module)
        for imported in mmcl_imports(path):
            if imported != "mmcl" and layer(imported) > own:
                offenders.append(f"{module} (layer {own}) imports {imported} (layer {layer(imported)})")
    assert not offenders, "\n".join(offenders)


def test_the_engine_names_no_method_and_no_scenario():
    text = (ROOT / "mmcl" / "engine.py").read_text()
    from mmcl.approaches import APPROACHES

    for name in APPROACHES.names():
        assert f'"{name}"' not in text, f"engine.py names the approach {name}"
    for path in (ROOT / "mmcl").rglob("*.py"):
        assert "scenario.name ==" not in path.read_text(), f"{path} compares a scenario's name"
