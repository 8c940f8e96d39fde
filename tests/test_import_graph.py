"""The import graph of lora_engine: no peft at run time, no import cycle, every module importable on its own.

The cycle check reads the source with ``ast`` (nothing is imported), over every module of ``lora_engine/`` and of
``kernels/`` (installed as ``lora_engine.kernels``). It counts every import: at module level, under
``if TYPE_CHECKING:``, inside functions, and the modules a file loads through ``importlib.import_module`` (every
string literal in such a file that names one of our modules, so a table of subcommand modules counts too).
"""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Package folder → the dotted name it is installed under (pyproject.toml's package-dir).
PACKAGE_FOLDERS = {ROOT / "lora_engine": "lora_engine", ROOT / "kernels": "lora_engine.kernels"}


def _module_files() -> dict[str, Path]:
    """Dotted module name → source file, for every module we ship."""
    modules = {}
    for folder, dotted in PACKAGE_FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([dotted, *parts])] = path
    return modules


MODULES = _module_files()


def _resolve(package: str, node: ast.ImportFrom) -> str:
    """The absolute name ``from <...> import`` reads from, in a module of ``package``."""
    if not node.level:
        return node.module
    base = package
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def _imports(module: str, source: str | None = None, is_package: bool | None = None) -> set[str]:
    """Our modules that ``module`` imports, wherever in its source the import stands (``source`` and
    ``is_package`` default to the file's)."""
    if source is None:
        source, is_package = (
            MODULES[module].read_text(encoding="utf-8"),
            MODULES[module].name == "__init__.py",
        )
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(source)
    found: set[str] = set()
    uses_import_module = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            origin = _resolve(package, node)
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                found.add(submodule if submodule in MODULES else origin)
        elif isinstance(node, ast.Call):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            uses_import_module |= name == "import_module"
    if uses_import_module:
        found.update(
            node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in MODULES
        )
    return {name for name in found if name in MODULES and name != module}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None. Iterative depth-first search."""
    state = dict.fromkeys(graph, "new")
    for start in sorted(graph):
        if state[start] != "new":
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = "on path"
        while stack:
            successor = next(stack[-1], None)
            if successor is None:
                state[path.pop()] = "done"
                stack.pop()
            elif state[successor] == "on path":
                return path[path.index(successor) :] + [successor]
            elif state[successor] == "new":
                state[successor] = "on path"
                path.append(successor)
                stack.append(iter(sorted(graph[successor])))
    return None


def _run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # Run outside the repository root: its kernels/ folder would shadow Hugging Face's kernels package.
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT.parent
    )


def test_the_module_list_covers_the_package_and_the_kernels():
    assert {"lora_engine", "lora_engine.tuner", "lora_engine.layers.base", "lora_engine.kernels"} <= set(
        MODULES
    )
    assert len(MODULES) > 40


def test_the_graph_sees_imports_in_functions_type_checking_blocks_and_import_module():
    source = textwrap.dedent(
        """
        import importlib
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from lora_engine.tuner import LoraModel
        SUBCOMMANDS = {"merge": "lora_engine.cli.merge"}
        def later():
            from ..layers import base
        def load(name):
            return importlib.import_module(SUBCOMMANDS[name])
        """
    )
    found = _imports("lora_engine.integrations.probe", source, is_package=False)
    assert found == {"lora_engine.tuner", "lora_engine.cli.merge", "lora_engine.layers.base"}


def test_the_cycle_search_finds_a_cycle_and_passes_a_tree():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    graph = {module: _imports(module) for module in MODULES}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_importing_lora_engine_imports_no_peft():
    result = _run_python(
        "import sys, lora_engine\n"
        "print(sorted(name for name in sys.modules if name == 'peft' or name.startswith('peft.')))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


# The heavy packages `import lora_engine` defers until a public name that needs them is first used.
HEAVY_PACKAGES = ("torch", "transformers", "accelerate", "bitsandbytes", "triton", "trl", "peft")


def test_importing_lora_engine_leaves_torch_transformers_and_bitsandbytes_unloaded():
    result = _run_python(
        "import sys, lora_engine\n"
        f"print(sorted(name for name in sys.modules if name.split('.')[0] in {HEAVY_PACKAGES!r}))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_a_public_name_loads_its_module_on_first_use():
    result = _run_python(
        "import sys, lora_engine\n"
        "from lora_engine import LoraConfig\n"
        "print(LoraConfig is sys.modules['lora_engine.config'].LoraConfig, 'torch' in sys.modules,"
        " 'LoraConfig' in vars(lora_engine), 'PeftModel' in dir(lora_engine))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "True True True True"


# Each module is imported in its own forked child of one Python process that has imported the third-party
# packages our modules import (torch, transformers, bitsandbytes ...) and none of ours: every child starts with no
# lora_engine module loaded, so a module that only imports after another, or through a cycle, fails in it. The
# fork spares each child the seconds torch and transformers take to import.
_IMPORT_EACH_ALONE = """
import importlib, os, sys, traceback
for name, attributes in {third_party!r}:
    try:
        imported = importlib.import_module(name)
        for attribute in attributes:  # transformers loads its submodules when a name is first read
            getattr(imported, attribute, None)
    except Exception:
        pass  # an optional dependency: the child importing our module reports it if it matters
assert not [name for name in sys.modules if name.split(".")[0] == "lora_engine"], "lora_engine preloaded"
failures, running = [], {{}}
pending = list({modules!r})
while pending or running:
    while pending and len(running) < {workers}:
        module = pending.pop()
        child = os.fork()
        if child == 0:
            sys.argv = [module, "--help"]  # lora_engine.__main__ runs the command line when imported
            try:
                importlib.import_module(module)
            except SystemExit as exit:
                os._exit(0 if exit.code == 0 and module.endswith("__main__") else 1)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        running[child] = module
    child, status = os.wait()
    if status != 0:
        failures.append(running[child])
    del running[child]
print("FAILED:", sorted(failures))
"""


def _module_level_nodes(tree: ast.Module):
    """The statements that run when the module is imported: not those inside functions or classes."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        yield node
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            pending.extend(ast.iter_child_nodes(node))


def _third_party_imports() -> list[tuple[str, list[str]]]:
    """``(module, names read from it)`` for every module outside the package that one of ours imports at import
    time, as written (``("transformers.pytorch_utils", ["Conv1D"])``)."""
    names: dict[str, set[str]] = {}
    for path in MODULES.values():
        for node in _module_level_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    names.setdefault(alias.name, set())
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names.setdefault(node.module, set()).update(alias.name for alias in node.names)
    ours = ("lora_engine", "kernels", "__future__")
    return [(name, sorted(read)) for name, read in sorted(names.items()) if name.split(".")[0] not in ours]


def test_every_module_imports_on_its_own():
    code = _IMPORT_EACH_ALONE.format(
        third_party=_third_party_imports(), modules=sorted(MODULES), workers=max(2, os.cpu_count() or 2)
    )
    result = _run_python(code, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1] == "FAILED: []", result.stderr[-4000:]
