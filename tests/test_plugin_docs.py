"""The plugin guide (docs/plugins.md) describes every hook, and tests exercise every hook.

The hooks are enumerated the way the core knows them: a real pluggy
`PluginManager` given `reservoir_middleware.hookspecs`, not a text search.
"Exercised" is decided by reading the test code's syntax trees: a test module
(tests/, plugins/*/tests/), or a module of this repository a test module
imports (a plugin package, a helper), must define a `@hookimpl` function of
that name, in a class the code actually uses.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy

from reservoir_middleware import Reservoir, ReservoirSettings, hookspecs
from reservoir_middleware.plugins import ENTRY_POINT_GROUP

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "plugins.md"


def spec_hooks() -> dict[str, pluggy.HookCaller]:
    """Every hook of the project, as a pluggy plugin manager registers it."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    hooks = {}
    for name in dir(pm.hook):
        caller = getattr(pm.hook, name)
        if isinstance(caller, pluggy.HookCaller) and caller.spec is not None:
            hooks[name] = caller
    return hooks


def _annotation(value: Any) -> str:
    return value if isinstance(value, str) else inspect.formatannotation(value)


def signature_line(caller: pluggy.HookCaller) -> str:
    """`def name(arg: type, ...) -> type:` as hookspecs.py declares it."""
    assert caller.spec is not None
    function = caller.spec.function
    signature = inspect.signature(function)
    params = ", ".join(
        f"{p.name}: {_annotation(p.annotation)}" for p in signature.parameters.values()
    )
    return f"def {caller.name}({params}) -> {_annotation(signature.return_annotation)}:"


def normalised(text: str) -> str:
    return " ".join(text.split())


def guide_sections() -> dict[str, str]:
    """Each `### \\`reservoir_…\\`` section of the guide, by hook name."""
    sections: dict[str, str] = {}
    current: str | None = None
    for line in GUIDE.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            found = re.fullmatch(r"###\s+`(reservoir_\w+)`\s*", line)
            current = found.group(1) if found else None
            if current is not None:
                assert current not in sections, f"{current} is described twice"
                sections[current] = ""
            continue
        if current is not None:
            sections[current] += line + "\n"
    return sections


def test_the_spec_is_what_the_core_calls() -> None:
    hooks = spec_hooks()
    assert len(hooks) >= 6
    assert all(name.startswith("reservoir_") for name in hooks)


def test_every_hook_is_described_in_the_guide_with_its_exact_signature() -> None:
    hooks = spec_hooks()
    sections = guide_sections()
    missing = sorted(set(hooks) - set(sections))
    assert not missing, f"docs/plugins.md does not describe: {missing}"
    stale = sorted(set(sections) - set(hooks))
    assert not stale, f"docs/plugins.md describes hooks that do not exist: {stale}"
    for name, caller in hooks.items():
        section = sections[name]
        wanted = normalised(signature_line(caller))
        lines = [normalised(line) for line in section.splitlines()]
        assert any(line.startswith(wanted) for line in lines), (
            f"the section of {name} lacks its signature line:\n  {wanted}"
        )
        for field in ("**Called:**", "**Returns:**", "**Awaitable:**", "**Raises:**"):
            assert field in section, f"the section of {name} says nothing under {field}"
        assert "None" in section, f"the section of {name} does not say what None means"
        assert caller.spec is not None
        if caller.spec.opts.get("firstresult"):
            assert "first non-None" in section, f"{name} is firstresult: say so"


# -- which hooks the tests exercise ---------------------------------------------------


@dataclass(frozen=True)
class Impl:
    hook: str
    args: tuple[str, ...]
    owner: str | None  # the class it is defined in (None: module level)
    path: Path
    line: int

    def __str__(self) -> str:
        where = f"{self.owner}." if self.owner else ""
        return f"{self.path.relative_to(ROOT)}:{self.line} {where}{self.hook}"


def _marker_names(tree: ast.Module) -> set[str]:
    """Names that decorate hook implementations in this module: `hookimpl`, and
    any name bound to `HookimplMarker(...)`."""
    names = {"hookimpl"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.update(a.asname for a in node.names if a.name == "hookimpl" and a.asname)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            func = node.value.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called == "HookimplMarker":
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _is_marker(decorator: ast.expr, markers: set[str]) -> bool:
    if isinstance(decorator, ast.Call):
        decorator = decorator.func
    if isinstance(decorator, ast.Name):
        return decorator.id in markers
    return isinstance(decorator, ast.Attribute) and decorator.attr in markers


def hook_impls(path: Path, tree: ast.Module) -> Iterator[Impl]:
    markers = _marker_names(tree)

    def functions(body: list[ast.stmt], owner: str | None) -> Iterator[Impl]:
        for node in body:
            if isinstance(node, ast.ClassDef):
                yield from functions(node.body, node.name)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                _is_marker(d, markers) for d in node.decorator_list
            ):
                args = tuple(a.arg for a in [*node.args.posonlyargs, *node.args.args])
                if owner is not None and args and args[0] in ("self", "cls"):
                    args = args[1:]
                yield Impl(node.name, args, owner, path, node.lineno)

    yield from functions(tree.body, None)


def _used_names(tree: ast.Module) -> set[str]:
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            used.add(node.id)
        elif isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.alias):
            used.add((node.asname or node.name).split(".")[-1])
    return used


def dirs_of_tests() -> list[Path]:
    return [ROOT / "tests", *sorted(ROOT.glob("plugins/*/tests"))]


def _resolve(module: str, roots: list[Path]) -> list[Path]:
    parts = module.split(".")
    found = []
    for root in roots:
        base = root.joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                found.append(candidate)
    return found


def _imports(path: Path, tree: ast.Module, roots: list[Path]) -> list[Path]:
    """The files of this repository that a module imports (not the core's)."""
    out: list[Path] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package
                base = path.parent
                for _ in range(node.level - 1):
                    base = base.parent
                prefix = [node.module] if node.module else []
                for alias in node.names:
                    for dotted in (*prefix, ".".join([*prefix, alias.name])):
                        out += _resolve(dotted, [base]) if dotted else []
                continue
            if node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        for name in names:
            if name.split(".")[0] == "reservoir_middleware":
                continue  # the core's built-ins do not count as tests
            out += _resolve(name, roots)
    return out


def reached_modules() -> dict[Path, ast.Module]:
    """Test modules and conftests, and every repository module they import,
    transitively (plugin packages in plugins/*/src, helpers in tests/)."""
    roots = [ROOT, *sorted(ROOT.glob("plugins/*/src"))]
    todo = [p for root in dirs_of_tests() for p in sorted(root.rglob("*.py"))]
    todo = [p for p in todo if p.name.startswith("test_") or p.name == "conftest.py"]
    seen: dict[Path, ast.Module] = {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        seen[path] = tree
        todo += _imports(path, tree, [path.parent, *roots])
    return seen


def exercised_impls() -> list[Impl]:
    """Hook implementations in tested code, in classes that code refers to."""
    modules = reached_modules()
    used = set().union(*(_used_names(tree) for tree in modules.values()))
    return [
        impl
        for path, tree in modules.items()
        for impl in hook_impls(path, tree)
        if impl.owner is None or impl.owner in used
    ]


def test_the_scan_finds_implementations_it_should() -> None:
    impls = {str(i).split(" ")[-1] for i in exercised_impls()}
    assert "Tagger.reservoir_rewrite_request" in impls  # tests/test_engine.py
    assert "Bm25Retrieval.reservoir_retrieve" in impls  # a plugin package a test imports
    # not a test: the core's built-ins
    assert "SemanticRetrieval.reservoir_retrieve" not in impls


def test_every_hook_is_exercised_by_a_test() -> None:
    impls = exercised_impls()
    covered = {impl.hook for impl in impls}
    untested = sorted(set(spec_hooks()) - covered)
    assert not untested, (
        f"no test (tests/, plugins/*/tests/) implements these hooks: {untested}; add a "
        "test with a plugin implementing them"
    )


def test_every_hook_implementation_in_tests_and_plugins_matches_a_spec() -> None:
    """A misspelt hook name is silently never called; an argument the spec does
    not have fails at registration. Catch both here."""
    hooks = spec_hooks()
    for impl in exercised_impls():
        assert impl.hook in hooks, f"{impl}: no such hook"
        spec = hooks[impl.hook].spec
        assert spec is not None
        extra = set(impl.args) - set(spec.argnames)
        assert not extra, f"{impl}: arguments the hook does not pass: {sorted(extra)}"


# -- the guide's example runs -----------------------------------------------------------


def example(label: str) -> str:
    """The fenced code block right after `<!-- example: LABEL -->` in the guide."""
    text = GUIDE.read_text(encoding="utf-8")
    found = re.search(
        r"<!-- example: " + re.escape(label) + r" -->\s*```\w*\n(.*?)\n```", text, re.DOTALL
    )
    assert found, f"no example {label!r} in docs/plugins.md"
    return found.group(1)


def load_example_module(name: str, source: str, tmp_path: Path) -> Any:
    path = tmp_path / f"{name}.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


async def test_the_guides_example_plugin_works(tmp_path: Path) -> None:
    project = tomllib.loads(example("pyproject.toml"))
    entry_points = project["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert entry_points == {"skip-smalltalk": "reservoir_skip_smalltalk:plugin"}
    assert project["project"]["dependencies"] == ["reservoir-middleware>=0.1"]

    module = load_example_module(
        "reservoir_skip_smalltalk", example("reservoir_skip_smalltalk/__init__.py"), tmp_path
    )
    plugin = module.plugin
    settings = ReservoirSettings(data_dir=tmp_path / "memory", load_entry_points=False)
    memory = Reservoir(settings, plugins=[plugin])
    assert ("skip-smalltalk", ["reservoir_prepare_record"]) in memory.hooks.describe()
    await memory.add(
        "p",
        "i",
        [
            {"role": "user", "content": "I moved to Lyon."},
            {"role": "assistant", "content": "Ok!"},
            {"role": "user", "content": "Thank you."},
        ],
    )
    assert [r.text for r in await memory.recent("p", "i")] == ["I moved to Lyon."]
    blocked = Reservoir(
        ReservoirSettings(
            data_dir=tmp_path / "memory", load_entry_points=False, disable_plugins="skip-smalltalk"
        ),
        plugins=[plugin],
    )
    assert "skip-smalltalk" not in dict(blocked.hooks.describe())


def test_readme_links_the_plugin_guide_and_the_plugins() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for target in (
        "docs/plugins.md",
        "plugins/reservoir-bm25/",
        "plugins/reservoir-recency/",
        "plugins/reservoir-redact/",
    ):
        assert f"]({target})" in readme, target
