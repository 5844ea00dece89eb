"""The layout keeps its promises: stages depend on exactly the code they run, no import runs
up a layer, one module talks to MLflow, and every setting is documented."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from digitops.inference.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
LIBRARY = SRC / "digitops"
# Lower layers never import higher ones; the three upper layers never import each other.
LAYERS = {
    "base": set(),
    "data": {"base"},
    "training": {"base", "data"},
    "release": {"base", "data"},
    "inference": {"base", "data"},
}
# The Bento packages the whole library and the service, not only the code its stage runs.
PACKAGING_STAGES = {"bento"}


def module_file(name: str) -> Path | None:
    """The file of a project module (digitops.x.y or pipelines.x), or None for other modules."""
    parts = name.split(".")
    if parts[0] == "digitops":
        base = SRC.joinpath(*parts)
    elif parts[0] in ("pipelines", "serving"):
        base = ROOT.joinpath(*parts)
    else:
        return None
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names, wherever the statement is (functions
    too), with `from package import module` resolved to the module."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_name(path: Path) -> str:
    root = SRC if path.is_relative_to(SRC) else ROOT
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[Path]:
    """Project files that importing `path` runs: its imports, their packages' __init__ files,
    transitively."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for name in imported_modules(current):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
                found = module_file(".".join(parts[:i]))
                if found is not None:
                    todo.append(found)
    return seen


def docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return len(body) <= 1 and all(
        isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body
    )


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def code_deps(stage: dict) -> set[Path]:
    """The .py files a stage's deps cover (folders expanded)."""
    covered = set()
    for dep in stage["deps"]:
        path = ROOT / dep
        if path.is_dir():
            covered.update(path.rglob("*.py"))
        elif path.suffix == ".py":
            covered.add(path)
    return covered


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_depends_on_exactly_the_code_it_runs(name):
    stage = stages()[name]
    script = ROOT / stage["cmd"].split()[-1].replace(".", "/")
    runs = project_imports(script.with_suffix(".py"))
    declared = code_deps(stage)
    missing = {p for p in runs - declared if not docstring_only(p)}
    assert not missing, f"{name} runs code its deps miss: {sorted(map(str, missing))}"
    if name not in PACKAGING_STAGES:
        extra = declared - runs
        assert not extra, f"{name} depends on code it never runs: {sorted(map(str, extra))}"


def layer_of(path: Path) -> str:
    relative = path.relative_to(LIBRARY)
    return relative.parts[0] if len(relative.parts) > 1 else "base"


@pytest.mark.parametrize(
    "path", sorted(LIBRARY.rglob("*.py")), ids=lambda p: str(p.relative_to(LIBRARY))
)
def test_no_import_runs_up_a_layer(path):
    own = layer_of(path)
    allowed = LAYERS[own] | {own}
    for name in imported_modules(path):
        target = module_file(name)
        if target is None or not target.is_relative_to(LIBRARY):
            continue
        assert layer_of(target) in allowed, f"{own} module {path.name} imports {name}"


def test_the_model_module_imports_only_torch():
    roots = {name.split(".")[0] for name in imported_modules(LIBRARY / "model.py")}
    assert roots <= {"__future__", "collections", "copy", "torch"}  # torch + the stdlib


def test_one_module_talks_to_mlflow():
    users = [
        path.relative_to(ROOT)
        for folder in ("src", "pipelines", "serving")
        for path in (ROOT / folder).rglob("*.py")
        if any(name.split(".")[0] == "mlflow" for name in imported_modules(path))
    ]
    assert users == [Path("src/digitops/tracking.py")]


def test_every_setting_is_in_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    table = set(re.findall(r"^\| `(DIGITOPS_[A-Z_]+)` \|", readme, flags=re.M))
    variables = {Settings.variable(name) for name in Settings.model_fields}
    assert variables <= table
    # And nothing else in the code reads a DIGITOPS_* variable behind the table's back.
    read = set()
    for folder in ("src", "pipelines", "serving", "conf"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".yaml"):
                read.update(re.findall(r"DIGITOPS_[A-Z_]+", path.read_text()))
    assert read - variables <= table, f"undocumented: {sorted(read - variables - table)}"


def test_settings_come_from_the_environment_and_bad_values_say_which():
    settings = Settings.from_env({"DIGITOPS_WORKERS": "2", "DIGITOPS_ADMIN_TOKEN": "t"})
    assert (settings.workers, settings.admin_token, settings.max_predictions) == (2, "t", 100_000)
    assert Settings.from_env({"DIGITOPS_MODEL_TAG": " "}).model_tag is None
    with pytest.raises(SettingsError, match="DIGITOPS_MAX_UPLOAD_BYTES: input should be a valid"):
        Settings.from_env({"DIGITOPS_MAX_UPLOAD_BYTES": "10MB"})
    with pytest.raises(SettingsError, match="DIGITOPS_WORKERS: input should be greater than 0"):
        Settings.from_env({"DIGITOPS_WORKERS": "0"})
    assert Settings.from_env({}).access_log
    assert not Settings.from_env({"DIGITOPS_ACCESS_LOG": "False"}).access_log
    with pytest.raises(SettingsError, match="DIGITOPS_ACCESS_LOG: .*valid boolean.*, got 'maybe'"):
        Settings.from_env({"DIGITOPS_ACCESS_LOG": "maybe"})


def test_the_deployment_launcher_and_the_benchmarks_are_not_shipped_nor_imported():
    """deploy/ (`python -m deploy.cluster`) and benchmarks/ (`make bench`) sit beside the
    library, outside the wheel (which packages src/ only); nothing shipped imports them."""
    assert not (LIBRARY / "deploy").exists() and not (ROOT / "tests" / "benchmarks").exists()
    assert (ROOT / "deploy" / "cluster.py").is_file() and (ROOT / "benchmarks").is_dir()
    for folder in ("src", "pipelines", "serving"):
        for path in (ROOT / folder).rglob("*.py"):
            roots = {name.split(".")[0] for name in imported_modules(path)}
            assert not roots & {"deploy", "benchmarks", "tests"}, path
    # The launcher reads the service's settings, and nothing of training or release.
    for path in (ROOT / "deploy").glob("*.py"):
        for name in imported_modules(path):
            if name.startswith("digitops."):
                assert name.split(".")[1] == "inference", f"{path.name} imports {name}"
