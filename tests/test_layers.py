"""The package's import graph flows one way: math -> building blocks -> run components -> run I/O
-> loop/CLI helpers -> entry points, and entry points never import each other.

Reads every module's source (AST, including imports inside functions), so a cycle cannot hide
behind a lazy import.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "asymflow_jax"

MATH, BLOCKS, COMPONENTS, RUN_IO, RUN, ENTRY = range(6)
LAYER_NAMES = ("math", "building blocks", "run components", "run I/O", "loop / CLI helpers", "entry points")

LAYERS = {
    "asymflow_jax": MATH,
    "asymflow_jax.asymflow": MATH,
    "asymflow_jax.subspace": BLOCKS,
    "asymflow_jax.models": BLOCKS,
    "asymflow_jax.models.jit_model": BLOCKS,
    "asymflow_jax.models.activations": BLOCKS,
    "asymflow_jax.models.attention": BLOCKS,
    "asymflow_jax.models.layout": BLOCKS,
    "asymflow_jax.models.asymjit": BLOCKS,
    "asymflow_jax.models.finetune": BLOCKS,
    "asymflow_jax.models.autoencoder": BLOCKS,
    "asymflow_jax.models.flux2": BLOCKS,
    "asymflow_jax.models.asymflux2": BLOCKS,
    "asymflow_jax.models.backbone": BLOCKS,
    "asymflow_jax.flux2_import": BLOCKS,
    "asymflow_jax.models.dinov2": BLOCKS,
    "asymflow_jax.models.repa": BLOCKS,
    "asymflow_jax.dinov2_import": BLOCKS,
    "asymflow_jax.data.t2i": BLOCKS,
    "asymflow_jax.colorspace": BLOCKS,
    "asymflow_jax.lift": BLOCKS,
    "asymflow_jax.data": BLOCKS,
    "asymflow_jax.data.pipeline": BLOCKS,
    "asymflow_jax.data.sources": BLOCKS,
    "asymflow_jax.sharding": BLOCKS,
    "asymflow_jax.distributed": BLOCKS,
    "asymflow_jax.image_io": BLOCKS,
    "asymflow_jax.evaluation": BLOCKS,
    "asymflow_jax.evaluation.classifier": BLOCKS,
    "asymflow_jax.evaluation.inception": BLOCKS,
    "asymflow_jax.evaluation.metrics": BLOCKS,
    "asymflow_jax.evaluation.lpips": BLOCKS,
    "asymflow_jax.evaluation.inception_import": ENTRY,   # the weights importer's command line
    "asymflow_jax.config": COMPONENTS,
    "asymflow_jax.experiment": COMPONENTS,
    "asymflow_jax.objective": COMPONENTS,
    "asymflow_jax.sampling": COMPONENTS,
    "asymflow_jax.t2i_sampling": COMPONENTS,
    "asymflow_jax.scoring": COMPONENTS,
    "asymflow_jax.checkpoint": RUN_IO,
    "asymflow_jax.metric_log": RUN_IO,
    "asymflow_jax.trainer": RUN,
    "asymflow_jax.cli": RUN,
    "asymflow_jax.train": ENTRY,
    "asymflow_jax.sample": ENTRY,
    "asymflow_jax.evaluate": ENTRY,
    "asymflow_jax.convert": ENTRY,
    "asymflow_jax.demo": ENTRY,
    "asymflow_jax.lift_demo": ENTRY,
    "asymflow_jax.subspace.__main__": ENTRY,
    "asymflow_jax.data.prep": ENTRY,
    "asymflow_jax.data.t2i_prep": ENTRY,
    "asymflow_jax.lift_flux2": ENTRY,
    "asymflow_jax.aot": ENTRY,
}


def _module_name(path: pathlib.Path, package: pathlib.Path = PACKAGE) -> str:
  parts = list(path.relative_to(package.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _imports(path: pathlib.Path, root: pathlib.Path):
  """(imported asymflow_jax module, line, inside a function?) for every import in the file."""
  tree = ast.parse(path.read_text())
  name = _module_name(path, root)
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
               for n in ast.walk(f)}
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
      # `from asymflow_jax import sampling` imports the module asymflow_jax.sampling
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in LAYERS else base for a in node.names]
    for name in names:
      if name == "asymflow_jax" or name.startswith("asymflow_jax."):
        while name not in LAYERS and "." in name:
          name = name.rpartition(".")[0]
        yield name, node.lineno, id(node) in functions


def _edges(root: pathlib.Path = PACKAGE):
  for path in sorted(root.rglob("*.py")):
    src = _module_name(path, root)
    for dst, line, in_function in _imports(path, root):
      if dst != src:
        yield src, dst, f"{path.relative_to(root.parent)}:{line}", in_function


def test_every_module_has_a_layer():
  modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
  assert modules - set(LAYERS) == set(), "assign new modules a layer in tests/test_layers.py"
  assert set(LAYERS) - modules == set(), "remove deleted modules from tests/test_layers.py"


def test_imports_never_go_up_a_layer_or_between_entry_points():
  bad = []
  for src, dst, where, _ in _edges():
    if LAYERS[dst] > LAYERS[src]:
      bad.append(f"{where}: {src} ({LAYER_NAMES[LAYERS[src]]}) imports {dst} ({LAYER_NAMES[LAYERS[dst]]})")
    elif LAYERS[dst] == ENTRY:
      bad.append(f"{where}: {src} imports the entry point {dst}")
  assert not bad, "\n".join(bad)


def test_no_function_level_imports_of_the_package():
  bad = [f"{where}: {src} imports {dst} inside a function" for src, dst, where, inside in _edges() if inside]
  assert not bad, "\n".join(bad)


def test_import_graph_has_no_cycles():
  graph: dict[str, set[str]] = {}
  for src, dst, _, _ in _edges():
    graph.setdefault(src, set()).add(dst)
  state: dict[str, int] = {}

  def visit(node, stack):
    state[node] = 1
    for nxt in graph.get(node, ()):
      if state.get(nxt) == 1:
        pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
      if nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = 2

  for node in graph:
    if node not in state:
      visit(node, [node])


def test_the_checker_sees_a_planted_upward_edge(tmp_path):
  """The walker is not vacuous: an upward import written in any of the supported forms is found."""
  src = tmp_path / "asymflow_jax" / "sharding.py"
  src.parent.mkdir()
  src.write_text("import os\n\ndef f():\n  from asymflow_jax import trainer\n  from . import checkpoint\n")
  found = [(dst, inside) for _, dst, _, inside in _edges(tmp_path / "asymflow_jax")]
  assert found == [("asymflow_jax.trainer", True), ("asymflow_jax.checkpoint", True)]
