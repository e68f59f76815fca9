"""The package's import graph, read with `ast` (every import, including those inside functions): no circle
anywhere, and no upward import (the math never imports the trainer, engines never import the pipeline).
The layers are the folders of docs/TRAINING.md's map; the README's layout table lists them."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "topd_ds"

# importer package -> packages it must never import (directly or through a function-level import)
FORBIDDEN = {
    "topd_ds.ot": ("topd_ds.loss", "topd_ds.rollout", "topd_ds.comm", "topd_ds.engines", "topd_ds.teacher",
                   "topd_ds.stage1", "topd_ds.studies", "topd_ds.train", "topd_ds.cli"),
    # the objective reads the local teacher's states and the median cap of the false-alarm labels, nothing else
    "topd_ds.loss": ("topd_ds.rollout.pipeline", "topd_ds.rollout.selection", "topd_ds.rollout.seeds", "topd_ds.comm",
                     "topd_ds.engines", "topd_ds.stage1", "topd_ds.studies", "topd_ds.train", "topd_ds.cli"),
    "topd_ds.teacher": ("topd_ds.rollout", "topd_ds.engines", "topd_ds.stage1", "topd_ds.studies", "topd_ds.train",
                        "topd_ds.cli"),
    "topd_ds.engines": ("topd_ds.rollout", "topd_ds.loss", "topd_ds.teacher", "topd_ds.stage1", "topd_ds.studies",
                        "topd_ds.train", "topd_ds.cli"),
    "topd_ds.data": ("topd_ds.rollout", "topd_ds.loss", "topd_ds.comm", "topd_ds.engines", "topd_ds.teacher",
                     "topd_ds.stage1", "topd_ds.studies", "topd_ds.train", "topd_ds.cli"),
    "topd_ds.rollout": ("topd_ds.loss", "topd_ds.stage1", "topd_ds.studies", "topd_ds.train", "topd_ds.cli"),
    # comm builds the engines (the student with its loss head and Ulysses attention, the local teacher)
    "topd_ds.comm": ("topd_ds.rollout.pipeline", "topd_ds.stage1", "topd_ds.studies", "topd_ds.train", "topd_ds.cli"),
}
ENTRY = ("topd_ds.train", "topd_ds.cli")  # only the CLI (and train's __main__ through it) reaches these


def module_names():
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(path, name, modules):
    """topd_ds modules imported anywhere in `path` (a from-import of a submodule counts as that submodule)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    # a module's `if __name__ == "__main__":` block runs it as a script through the CLI: not an import of the module
    tree.body = [n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("topd_ds"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("topd_ds"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def graph():
    modules = module_names()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def _cycles(g):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def _within(name, prefix):
    return name == prefix or name.startswith(prefix + ".")


def test_no_import_circle():
    g = graph()
    # a package's __init__ importing its own modules is not a circle of the architecture
    g = {k: {m for m in v if not (k.count(".") and _within(m, k))} for k, v in g.items()}
    assert _cycles(g) == [], f"import circles: {_cycles(g)}"


def test_no_upward_import():
    bad = []
    for name, deps in graph().items():
        for prefix, forbidden in FORBIDDEN.items():
            if _within(name, prefix):
                bad += [f"{name} -> {d}" for d in deps if any(_within(d, f) for f in forbidden)]
        if name not in ENTRY and name != "topd_ds.cli":
            bad += [f"{name} -> {d}" for d in deps if d in ENTRY]
    assert bad == [], "upward imports:\n" + "\n".join(sorted(bad))


def test_checker_sees_a_circle():
    """The checker itself: a made-up circle and an upward edge are found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
