"""The package's import layers (DESIGN.md "Training core", STYLE.md "Layers you can see"), read from the source.

Every import of a dreambooth module, at the top of a file or inside a function, points to the same or a lower
layer, and the import graph has no cycle. A new module must be given a layer here.
"""

import ast
from pathlib import Path

import dreambooth

PACKAGE = Path(dreambooth.__file__).parent
# lowest first; a name is a module, or a package and everything in it (checkpoint, families, demo)
LAYERS = [
    ["dreambooth", "errors", "events", "fileio", "checkpoints", "runlock"],
    # the mechanism of model files: safe loading, byte ranges, table-driven renaming, bundled tokenizers
    [
        "config",
        "performance",
        "optimizers",
        "grids",
        "plots",
        "objectives",
        "checkpoint",
        "storage",
        "blockswap",
        "memory",
        "losses",
        "ema",
        "buckets",
    ],
    # what differs per family: training behaviour, key tables, detection, shapes, LoRA naming
    ["families"],
    # the files users bring and take: convert, export, inspect, LoRA files (dispatching to the families)
    ["formats", "tiny_model"],
    ["data", "sample", "adapters", "preflight", "trackers", "doctor", "distributed", "report", "validation"],
    ["prior", "train", "plan"],
    ["launch", "pipeline"],
    ["cli", "demo", "ui", "__main__"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every dreambooth module the file imports; `from dreambooth import x` names dreambooth.x."""
    package = module_name(path).split(".")[: None if path.name == "__init__.py" else -1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*package[: len(package) + 1 - node.level], node.module or ""]).rstrip(".")
            base = base if node.level else node.module
            found += [(node.lineno, f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base) for a in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "dreambooth"]


def layer_of(module: str) -> int:
    for number, names in enumerate(LAYERS):
        for name in names:
            full = "dreambooth" if name == "dreambooth" else f"dreambooth.{name}"
            if module == full or (full != "dreambooth" and module.startswith(full + ".")):
                return number
    raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_layers.py")


def test_no_module_imports_a_higher_layer_and_no_import_cycle():
    graph, problems = {}, []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        graph[module] = set()
        layer_of(module)  # every module has a layer
        for line, imported in imports(path):
            graph[module].add(imported)
            if layer_of(imported) > layer_of(module):
                problems.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {module} (layer {layer_of(module)}) imports "
                    f"{imported} (layer {layer_of(imported)})"
                )
    state: dict[str, str] = {}
    cycles: list[str] = []

    def visit(module: str, trail: list[str]) -> None:  # depth first; an import of an open module closes a cycle
        state[module] = "open"
        for other in sorted(graph.get(module, ()) - {module}):
            if state.get(other) == "open":
                cycles.append("import cycle: " + " → ".join([*trail[trail.index(other) :], other]))
            elif other not in state:
                visit(other, [*trail, other])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not problems + cycles, "\n".join(problems + cycles[:1])  # one cycle: mending it may mend the rest
