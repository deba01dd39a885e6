"""Layering: the core of the package imports neither the GLUE harness nor the integrations,
and those two use only the core's public names.

The core (the op, backends, solves, layout, collection, projector, ...) and the reusable
adapters must stand alone; ``glue`` and ``integrations`` build on them, never the reverse.
Imports are read with ``ast`` (nothing is executed), relative ones resolved against the
importing module, including imports inside functions (lazy imports count too).
"""
import ast
from pathlib import Path

import pytest

import ortholora_kernels

PKG_DIR = Path(ortholora_kernels.__file__).resolve().parent
PKG = "ortholora_kernels"
#: the layers that sit on top of the core
UPPER = (f"{PKG}.glue", f"{PKG}.integrations")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _core_modules() -> list[Path]:
    upper_dirs = [PKG_DIR / u.rsplit(".", 1)[1] for u in UPPER]
    return sorted(p for p in PKG_DIR.rglob("*.py")
                  if not any(d == p.parent or d in p.parents for d in upper_dirs))


def _imports(path: Path, source: str | None = None) -> set[str]:
    """Fully qualified names of every module (or module attribute) ``path`` imports
    (``source``: its text, read from ``path`` by default)."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)   # `from . import glue`
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and not node.args[0].value.startswith(".")):
            out.add(node.args[0].value)
    return out


def _upper(name: str) -> bool:
    return any(name == u or name.startswith(u + ".") for u in UPPER)


def test_the_core_list_is_what_it_should_be():
    names = {_module_name(p) for p in _core_modules()}
    for expected in ("ops", "backends", "backends.base", "solve", "solvers", "aggregate", "layout", "collect",
                     "projector", "result", "reference", "pcgrad", "pipeline", "rng", "adapters", "adapters.common",
                     "adapters.mtl_lora", "adapters.lori", "distributed", "distributed.reduce",
                     "distributed.sharded"):
        assert f"{PKG}.{expected}" in names
    assert not any(_upper(n) for n in names)


@pytest.mark.parametrize("path", _core_modules(), ids=lambda p: _module_name(p))
def test_core_module_imports_neither_glue_nor_integrations(path):
    mod = _module_name(path)
    bad = sorted(name for name in _imports(path) if _upper(name))
    assert not bad, f"{mod} imports the layer(s) above the core: {bad}"


def test_the_checker_sees_every_import_form():
    """The parser catches absolute, relative, `from .. import x`, lazy and importlib imports."""
    where = PKG_DIR / "backends" / "base.py"   # relative imports resolve from backends/
    src = ("import ortholora_kernels.glue.cli\n"
           "from ..integrations import trainer\n"
           "from .. import glue\n"
           "from . import torch_impl\n"
           "def f():\n    from ..integrations.distributed import broadcast_params\n"
           "import importlib\nimportlib.import_module('ortholora_kernels.glue.train')\n")
    names = _imports(where, src)
    assert {n for n in names if _upper(n)} == {
        "ortholora_kernels.glue.cli", "ortholora_kernels.integrations", "ortholora_kernels.integrations.trainer",
        "ortholora_kernels.glue", "ortholora_kernels.integrations.distributed",
        "ortholora_kernels.integrations.distributed.broadcast_params", "ortholora_kernels.glue.train"}
    assert "ortholora_kernels.backends.torch_impl" in names and not _upper("ortholora_kernels.layout")


#: private attributes of third-party objects that the upper layers use knowingly (argparse's
#: parser tree, for the sweep's view of the train options)
THIRD_PARTY_PRIVATE = {"_subparsers", "_group_actions", "_actions"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_reaches(path: Path, source: str | None = None) -> list[str]:
    """What ``path`` reaches that is private: ``obj._x`` and ``getattr(obj, "_x")`` on any
    object but ``self``/``cls``/``super()`` (``ast`` cannot tell an object's type, so every
    private attribute counts but the third-party ones in :data:`THIRD_PARTY_PRIVATE`), and
    private modules or names imported from the core."""
    text = path.read_text() if source is None else source
    out = []
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, ast.Attribute) and _is_private(node.attr) and node.attr not in THIRD_PARTY_PRIVATE:
            v = node.value
            own = (isinstance(v, ast.Name) and v.id in ("self", "cls")) or (
                isinstance(v, ast.Call) and getattr(v.func, "id", None) == "super")
            if not own:
                out.append(ast.unparse(node))
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr")
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and _is_private(node.args[1].value)
              and not (isinstance(node.args[0], ast.Name) and node.args[0].id == "self")):
            out.append(ast.unparse(node))
    for name in _imports(path, text):
        if name.startswith(PKG + ".") and not _upper(name) and any(_is_private(c) for c in name.split(".")[1:]):
            out.append(f"import {name}")
    return sorted(out)


def _upper_modules() -> list[Path]:
    return sorted(p for u in UPPER for p in (PKG_DIR / u.rsplit(".", 1)[1]).rglob("*.py"))


@pytest.mark.parametrize("path", _upper_modules(), ids=lambda p: _module_name(p))
def test_upper_layers_use_only_public_names_of_the_core(path):
    """glue/ and integrations/ use the core through its public API: no private attribute
    (``ortho._aggregator``), no private module or name (``from ..backends.torch_impl import _x``)."""
    bad = _private_reaches(path)
    assert not bad, f"{_module_name(path)} reaches private names: {bad}"


def test_the_private_reach_checker_sees_them():
    where = PKG_DIR / "glue" / "methods.py"
    src = ("from ..backends.torch_impl import _product64, combine\n"
           "from .. import _args\n"
           "from .train import _num_steps\n"            # inside the harness: fine
           "def f(p, parser):\n"
           "    p._aggregator.load_state_dict({})\n"
           "    getattr(p, '_generator', None)\n"
           "    self._x, super()._y(), parser._actions\n")
    assert _private_reaches(where, src) == sorted([
        "import ortholora_kernels.backends.torch_impl._product64", "import ortholora_kernels._args",
        "p._aggregator", "getattr(p, '_generator', None)"])


def test_integrations_reexport_the_core_distributed_helpers():
    """The torch.distributed helpers live in the core; ``integrations`` hands out the same objects."""
    from ortholora_kernels import distributed, integrations
    names = [n for n in integrations.__all__ if hasattr(distributed, n)]
    assert set(names) == {"all_reduce_task_grads", "all_reduce_grads", "exclude_from_ddp", "release_from_ddp",
                          "broadcast_params", "global_task_counts"}
    for n in names:
        assert getattr(integrations, n) is getattr(distributed, n)
    assert not (PKG_DIR / "integrations" / "distributed.py").exists()
    assert not (PKG_DIR / "integrations" / "sharded.py").exists()


@pytest.mark.parametrize("path", sorted((PKG_DIR / "integrations").rglob("*.py")), ids=lambda p: _module_name(p))
def test_integrations_do_not_import_the_glue_harness(path):
    """The Trainer/peft/accelerate integrations need only the core: a user of the Trainer never
    imports the GLUE harness (checkpoint files come from :mod:`ortholora_kernels.checkpoint`)."""
    glue = f"{PKG}.glue"
    bad = sorted(n for n in _imports(path) if n == glue or n.startswith(glue + "."))
    assert not bad, f"{_module_name(path)} imports the GLUE harness: {bad}"


# ---- the one composition ------------------------------------------------------------------------

#: a backend's passes over memory and its fusions: only the pipeline puts them together
BACKEND_PASSES = {"gram", "cross", "combine", "gram_solve", "fused_forward", "solve_vjp"}


def _backend_pass_calls(path: Path, source: str | None = None) -> list[str]:
    """Calls ``<obj>.<pass>(...)`` of a backend pass on anything but a module we know is not a
    backend (``torch``, ``np``) in ``path``."""
    text = path.read_text() if source is None else source
    out = []
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in BACKEND_PASSES:
            base = node.func.value
            if isinstance(base, ast.Name) and base.id in ("torch", "np", "pipeline", "self"):
                continue
            out.append(ast.unparse(node.func))
    return sorted(out)


def _outside_pipeline() -> list[Path]:
    return [p for p in sorted(PKG_DIR.rglob("*.py"))
            if p.name != "pipeline.py" and PKG_DIR / "backends" not in p.parents]


@pytest.mark.parametrize("path", _outside_pipeline(), ids=lambda p: _module_name(p))
def test_only_the_pipeline_calls_the_backend_passes(path):
    """Gram -> Gram stage -> solve -> combine is composed once (ortholora_kernels/pipeline.py):
    no other module calls a backend's gram/cross/combine or a fusion of them."""
    bad = _backend_pass_calls(path)
    assert not bad, f"{_module_name(path)} calls backend passes itself: {bad}"


def test_the_backend_pass_checker_sees_them():
    where = PKG_DIR / "aggregate.py"
    src = ("from . import backends, pipeline\n"
           "def f(x, seg, w):\n"
           "    impl = backends.get('torch')\n"
           "    g = impl.gram(x, seg)\n"
           "    backends.get('native').fused_forward(x, seg, None, 'sum')\n"
           "    pipeline.combine(x, seg, w, 'torch')\n"
           "    torch.combine = 1\n")
    assert _backend_pass_calls(where, src) == ["backends.get('native').fused_forward", "impl.gram"]
    # and the pipeline itself does call them (the checker is not vacuous)
    assert _backend_pass_calls(PKG_DIR / "pipeline.py")


def _projector_privates() -> set[str]:
    from ortholora_kernels import OrthoLoRA
    names = {n for n in vars(OrthoLoRA) if _is_private(n)}
    src = (PKG_DIR / "projector.py").read_text()
    for node in ast.walk(ast.parse(src)):   # attributes set on self in its methods
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                and _is_private(node.attr):
            names.add(node.attr)
    return names


def _distributed_reach(path: Path, privates: set[str], source: str | None = None) -> list[str]:
    text = path.read_text() if source is None else source
    out = [f"import {n}" for n in _imports(path, text)
           if n == f"{PKG}.projector" or n.startswith(f"{PKG}.projector.") or n.endswith(".OrthoLoRA")]
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, ast.Attribute) and node.attr in privates:
            out.append(ast.unparse(node))
        elif isinstance(node, ast.Name) and node.id in ("ortho", "OrthoLoRA"):
            out.append(node.id)
    return sorted(set(out))


@pytest.mark.parametrize("path", sorted((PKG_DIR / "distributed").rglob("*.py")), ids=lambda p: _module_name(p))
def test_distributed_takes_tensors_and_plans_not_the_projector(path):
    """distributed/ gets buffers, partial Grams, layouts and shard plans, never the OrthoLoRA
    object: it imports no projector and reaches none of OrthoLoRA's private attributes."""
    bad = _distributed_reach(path, _projector_privates())
    assert not bad, f"{_module_name(path)} drives OrthoLoRA: {bad}"


def test_the_distributed_checker_sees_them():
    privates = _projector_privates()
    assert {"_get_generator", "_set_grads", "_shard_plan", "_aggregate"} <= privates
    where = PKG_DIR / "distributed" / "reduce.py"
    src = ("from ..projector import OrthoLoRA\n"
           "def f(ortho, buf):\n"
           "    gen = ortho._get_generator(buf.device)\n"
           "    plan = o._shard_plan\n")
    assert _distributed_reach(where, privates, src) == sorted({
        "import ortholora_kernels.projector", "import ortholora_kernels.projector.OrthoLoRA", "ortho",
        "ortho._get_generator", "o._shard_plan"})


# ----------------------------------------------------------------------------- no import circle

def _package_import_graph(sources: dict | None = None):
    """The package's import graph: an edge ``a -> b`` when module ``a`` imports module ``b``
    (at the top or inside a function; ``from pkg import name`` counts as importing ``pkg.name``
    when that is a module, else ``pkg``). ``sources``: ``{module name: text}`` overriding or
    adding modules (for the checker's own test)."""
    import networkx as nx

    files = {_module_name(p): p for p in PKG_DIR.rglob("*.py")}
    texts = {m: None for m in files} | dict(sources or {})

    def owner(name):
        while name not in texts and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in texts else None

    graph = nx.DiGraph()
    for mod, text in texts.items():
        path = files.get(mod) or PKG_DIR.parent.joinpath(*mod.split(".")).with_suffix(".py")
        source = path.read_text() if text is None else text
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        graph.add_node(mod)
        for node in ast.walk(ast.parse(source, filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in texts else base for a in node.names]
            else:
                continue
            for name in names:
                target = owner(name) if name == PKG or name.startswith(PKG + ".") else None
                if target is not None and target != mod:
                    graph.add_edge(mod, target)
    return graph


def _circles(graph) -> list:
    import networkx as nx

    return sorted(sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1)


def test_the_package_import_graph_has_no_circle():
    """No two modules import each other, directly or through others, not even lazily: every
    module can be read (and imported) after the ones it uses. Shared pieces go into a module
    of their own (e.g. the harness's ``options`` for the CLI and the sweep)."""
    circles = _circles(_package_import_graph())
    assert not circles, f"import circles (each set imports itself through the others): {circles}"


def test_the_circle_checker_sees_lazy_and_relative_circles():
    a, b = f"{PKG}.glue.cli", f"{PKG}.glue.sweep"
    graph = _package_import_graph({
        a: "def f():\n    from .sweep import plan\n",
        b: "def g():\n    from . import cli\n",
        f"{PKG}.glue.report": "from .intervals import t_interval\n",
        f"{PKG}.glue.intervals": "import math\n",
    })
    assert graph.has_edge(a, b) and graph.has_edge(b, a)
    assert [a, b] in _circles(graph)
    assert graph.has_edge(f"{PKG}.glue.report", f"{PKG}.glue.intervals")
    assert not graph.has_edge(f"{PKG}.glue.intervals", f"{PKG}.glue.report")
    # `from . import name` of a plain name (not a module) is an edge to the package itself
    graph = _package_import_graph({b: "from . import parse_tasks\n"})
    assert graph.has_edge(b, f"{PKG}.glue")
