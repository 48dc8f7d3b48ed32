"""The README's Architecture section, kept true: imports between lora_gpt2's parts go one way, and
only the CLI prints or exits. Walks every module's import statements (inside functions too)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lora_gpt2"
BASE = {"errors", "atomic", "tokenizer", "chat_template", "layout", "config", "devices", "runs", "allocator"}
FRONT = {"__init__", "__main__"}  # `import lora_gpt2` (lazy load_pretrained), `python -m lora_gpt2`
# each part and the parts it may import (besides the base modules, which import only each other)
MAY_IMPORT = {
    "front": {"cli", "checkpoints"},
    "base": set(),
    "adapters": set(),
    "model": {"adapters"},
    "checkpoints": {"model", "adapters"},
    "data": set(),
    "inference": {"checkpoints", "model", "adapters"},
    "training": {"data", "checkpoints", "model", "adapters"},
    "serve": {"inference", "checkpoints", "model", "adapters"},
    "cli": {"serve", "training", "inference", "data", "checkpoints", "model", "adapters"},
}


def part_of(module: str) -> str:
    """'lora_gpt2.inference.bank' -> 'inference'; top-level modules are the base."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in FRONT:
        return "front"
    return "base" if parts[1] in BASE else parts[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every lora_gpt2 module `path` imports, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "lora_gpt2":
                continue
            for alias in node.names:  # `from .. import tokenizer` imports a module
                sub = f"{target}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                    (PACKAGE.parent / Path(*sub.split("."))).is_dir()
                found.add(sub if is_module else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lora_gpt2"}
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_the_walk_sees_every_part():
    parts = {part_of(module_name(p)) for p in MODULES}
    assert parts == set(MAY_IMPORT)
    assert imports_of(PACKAGE / "inference" / "session.py") >= {"lora_gpt2.tokenizer", "lora_gpt2.model.gpt2",
                                                                "lora_gpt2.inference.decoding"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_one_way(path):
    here = part_of(module_name(path))
    for target in imports_of(path):
        if target == "lora_gpt2":  # the package itself: its __version__
            continue
        there = part_of(target)
        if there in ("base", here):
            continue
        assert there in MAY_IMPORT[here], f"{module_name(path)} ({here}) imports {target} ({there})"


@pytest.mark.parametrize("path", [p for p in MODULES if part_of(module_name(p)) != "cli"],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_cli_prints_or_exits(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            assert name not in ("print", "sys.exit", "exit", "quit", "os._exit", "typer.Exit"), \
                f"{module_name(path)} calls {name} at line {node.lineno}"
        if isinstance(node, ast.Raise) and node.exc is not None:
            assert "SystemExit" not in ast.unparse(node.exc), f"{module_name(path)} raises SystemExit"
    assert not {"typer", "tqdm"} & {a.name.split(".")[0] for n in ast.walk(tree)
                                     if isinstance(n, (ast.Import,)) for a in n.names}


def test_a_layer_holds_its_maths():
    """The spec's layers carry no decoding or serving state: nothing of blocked copies, folded
    updates or per-row hooks is spelled in adapters/ (inference/ installs and removes them)."""
    for path in (PACKAGE / "adapters").glob("*.py"):
        text = path.read_text()
        for word in ("mkldnn", "_version", "packed", "self.extra", "self.folded", "register_forward"):
            assert word not in text, f"{path.name} mentions {word!r}"


def _code_strings(tree: ast.AST) -> set[str]:
    """String constants of a module that are not docstrings."""
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs}


def test_only_the_run_folder_spells_a_runs_paths():
    """runs.RunFolder names every path of a run; nothing else writes "best", "metrics.jsonl", ...
    (the one other "last" is --layers' "the last N blocks")."""
    names = {"best", "last", "metrics.jsonl", "loss.png", ".lock", "wandb-run-id", "config.json"}
    allowed = {("lora_gpt2.config", "last")} | {(m, "config.json") for m in (
        "lora_gpt2.checkpoints.hf", "lora_gpt2.checkpoints.hub", "lora_gpt2.checkpoints.merged",
        "lora_gpt2.checkpoints.outputs")}  # Hugging Face's config.json of a model folder, not a run's
    for path in MODULES:
        name = module_name(path)
        if name == "lora_gpt2.runs":
            continue
        spelled = {s for s in _code_strings(ast.parse(path.read_text())) if s in names} - \
            {s for m, s in allowed if m == name}
        assert not spelled, f"{name} spells {sorted(spelled)}; ask runs.RunFolder"
