"""Promises the repository makes to a newcomer: pins agree, runtime data stays out of git, the
MLproject entry points run as documented, and the packages depend on each other in one direction."""

from __future__ import annotations

import ast
import functools
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from common.paths import REPO_ROOT

MLFLOW = str(Path(sys.executable).parent / "mlflow")


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.strip().lstrip("- ").strip()
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]+\])?==([^\s#]+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(3)
    return pins


def test_conda_env_carries_the_same_pins_as_requirements():
    requirements = _pins((REPO_ROOT / "requirements.txt").read_text().splitlines())
    conda = yaml.safe_load((REPO_ROOT / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert _pins(pip_section) == requirements
    assert "python=3.11" in conda["dependencies"]


def test_every_requirement_is_in_the_lock_at_the_same_version():
    lock = _pins((REPO_ROOT / "constraints.txt").read_text().splitlines())
    for name in ("requirements.txt", "requirements-dev.txt"):
        for package, version in _pins((REPO_ROOT / name).read_text().splitlines()).items():
            assert lock.get(package.replace("_", "-")) == version or lock.get(package.replace("-", "_")) == version, (
                f"{name}: {package}=={version} is not locked in constraints.txt")


def test_runtime_data_is_ignored_by_git():
    runtime = ["data/requests.db", "data/reference_data.db", "mlflow.db", "mlruns/1/meta.yaml",
               "drift_result.json", ".api_token", ".venv/bin/python", "data/creditcard.csv",
               "data/archive/month=2026-01/part-000000000001-000000000002.parquet"]
    result = subprocess.run(["git", "check-ignore", *runtime], cwd=REPO_ROOT, capture_output=True, text=True)
    assert sorted(result.stdout.split()) == sorted(runtime)
    kept = subprocess.run(["git", "check-ignore", "mlruns/.gitkeep", "data/drift_config.json"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert kept.stdout == ""


def test_readme_quick_start_has_exactly_the_two_commands():
    readme = (REPO_ROOT / "README.md").read_text()
    first_section = readme.split("\n## ", 2)[1]
    commands = re.findall(r"^\s*(make \S+)\s*$", first_section, flags=re.M)
    assert commands == ["make run", "make test"]


def test_ci_script_calls_the_readme_test_command():
    assert "make test" in (REPO_ROOT / ".ci/run").read_text()


@pytest.mark.slow
def test_mlflow_run_generate_then_import_csv(tmp_path):
    # As after `source .venv/bin/activate`: MLproject commands call `python`.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "MLFLOW_ARTIFACT_ROOT": str(tmp_path / "mlruns"), "FEATURE_CONFIG": str(tmp_path / "fc.json")}
    csv, db = tmp_path / "cc.csv", tmp_path / "ref.db"
    subprocess.run([MLFLOW, "run", ".", "-e", "generate", "--env-manager", "local", "-P", "rows=1000",
                    "-P", "seed=2", "-P", f"out={csv}", "-P", "fraud_rate=0.01"],
                   cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=300)
    run = subprocess.run([MLFLOW, "run", ".", "-e", "import_csv", "--env-manager", "local", "-P", f"csv={csv}",
                          "-P", f"db={db}"], cwd=REPO_ROOT, env=env, check=True, capture_output=True, text=True,
                         timeout=300)
    assert "added 1000 new rows" in run.stdout
    assert (tmp_path / "fc.json").exists()


def test_every_setting_is_in_the_readme_table():
    """Each reader in common/settings.py names its variable first in its docstring; the README's
    configuration table must list every one of them."""
    source = (REPO_ROOT / "common/settings.py").read_text()
    variables = set(re.findall(r'"""([A-Z][A-Z0-9_]+)[;( ]', source))
    variables |= set(re.findall(r"\band ([A-Z][A-Z0-9_]+) \(", source))  # "API_TOKEN (...) and API_TOKEN_FILE (...)"
    table = {m for m in re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", (REPO_ROOT / "README.md").read_text(), flags=re.M)}
    assert {"API_TOKEN", "LATEST_DB", "FRAUD_THRESHOLD", "MLFLOW_TRACKING_URI", "MODEL_NAME"} <= variables
    assert variables - table == set()


def test_mlproject_train_defaults_are_the_training_defaults():
    # `mlflow run . -e train`, `python -m training.train` and the benchmarks' bare fit (TrainParams())
    # must train the same forest; a default changed in one place only made the benchmark compare a
    # bare fit on 70 % bootstrap samples with a run on 50 %.
    import dataclasses

    from training.train import TrainParams

    entry = yaml.safe_load((REPO_ROOT / "MLproject").read_text())["entry_points"]["train"]
    declared = {name: spec["default"] for name, spec in entry["parameters"].items()}
    defaults = {f.name: getattr(TrainParams(), f.name) for f in dataclasses.fields(TrainParams)}
    assert declared == defaults
    for name in defaults:
        assert f"--{name} {{{name}}}" in " ".join(entry["command"].split())


# --- imports ------------------------------------------------------------------------------------------

PACKAGES = ("common", "service", "training", "monitoring", "benchmarks")
# A test module or a conftest imported by its bare name (pytest puts test folders on sys.path).
TEST_MODULE_NAME = re.compile(r"conftest|test_\w*|\w*_test")


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository, with forward slashes
    line: int
    statement: str
    targets: tuple[str, ...]  # the module it names and, for `from m import a`, also m.a (a may be a module)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.statement}"


def _python_files() -> list[Path]:
    found = []
    for root, dirs, files in os.walk(REPO_ROOT):  # symlinks (.venv, node_modules) are not followed
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("node_modules", "__pycache__"))
        found += [Path(root) / name for name in sorted(files) if name.endswith(".py")]
    return found


@functools.cache
def _imports() -> tuple[Import, ...]:
    """Every import statement of every .py file, lazy ones inside functions included."""
    found = []
    for path in _python_files():
        relative = path.relative_to(REPO_ROOT)
        package = list(relative.parts[:-1])
        for node in ast.walk(ast.parse(path.read_text(), filename=str(relative))):
            if isinstance(node, ast.Import):
                targets = tuple(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                module = ".".join([*base, *(node.module.split(".") if node.module else [])])
                targets = (module, *(f"{module}.{alias.name}" for alias in node.names))
            else:
                continue
            found.append(Import(relative.as_posix(), node.lineno, ast.unparse(node), targets))
    assert any(i.file == "training/train.py" for i in found), "the import scan found none of training/train.py"
    return tuple(found)


def _route(edges: dict[tuple[str, str], list[Import]], start: str, goal: str) -> list[str] | None:
    """The shortest chain of package imports from `start` to `goal`, or None."""
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        if path[-1] == goal:
            return path
        for source, target in sorted(edges):
            if source == path[-1] and target not in seen:
                seen.add(target)
                paths.append([*path, target])
    return None


def test_packages_import_each_other_in_one_direction_and_common_imports_none():
    edges: dict[tuple[str, str], list[Import]] = {}
    for imp in _imports():
        source = imp.file.split("/")[0]
        if source in PACKAGES:
            for target in sorted({t.split(".")[0] for t in imp.targets} & set(PACKAGES) - {source}):
                edges.setdefault((source, target), []).append(imp)
    problems = [f"{imp} (common must import none of {', '.join(PACKAGES[1:])})"
                for (source, _), imports in sorted(edges.items()) if source == "common" for imp in imports]
    # Among the others; an import of common's is reported above and would only repeat it here.
    others = {edge: imports for edge, imports in edges.items() if edge[0] != "common"}
    cycles: set[frozenset] = set()
    for source, target in sorted(others):
        back = _route(others, target, source)
        if back is None:
            continue
        steps = list(zip([source, *back], back, strict=False))
        if frozenset(steps) in cycles:
            continue
        cycles.add(frozenset(steps))
        # Listed from the step with the fewest imports: the likeliest to be the one in the wrong direction.
        first = min(range(len(steps)), key=lambda i: len(others[steps[i]]))
        steps = steps[first:] + steps[:first]
        problems.append(f"import cycle {' -> '.join([steps[0][0], *(b for _, b in steps)])}:")
        problems += [f"  {a} -> {b}: {imp}" for a, b in steps for imp in others[(a, b)]]
    assert problems == [], "imports between packages must go one way:\n" + "\n".join(problems)


def test_no_module_outside_tests_imports_tests():
    problems = [str(imp) for imp in _imports()
                if not imp.file.startswith("tests/") and any(t.split(".")[0] == "tests" for t in imp.targets)]
    assert problems == [], "product and benchmark modules must not import tests:\n" + "\n".join(problems)


def test_tests_import_no_other_test_module_or_conftest_only_helpers():
    def is_test_module(target: str) -> bool:
        parts = target.split(".")
        if parts[0] == "tests":
            return len(parts) > 1 and parts[1] != "helpers"
        return TEST_MODULE_NAME.fullmatch(parts[0]) is not None

    problems = [str(imp) for imp in _imports()
                if imp.file.startswith("tests/") and any(is_test_module(t) for t in imp.targets)]
    assert problems == [], ("tests share code through fixtures or tests/helpers, never by importing a test module "
                            "or a conftest:\n" + "\n".join(problems))


def test_the_readme_stays_a_short_guide():
    assert len((REPO_ROOT / "README.md").read_bytes()) < 20_000


def test_every_relative_link_in_the_docs_resolves():
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO_ROOT)} -> {target}")
    assert not broken


def test_the_pipeline_archives_after_the_checks_and_before_training_through_the_mlproject_entry_point():
    jobs = yaml.safe_load((REPO_ROOT / ".github" / "workflows" / "mlops.yml").read_text())["jobs"]
    assert set(jobs["archive"]["needs"]) == {"drift", "performance"}
    assert "archive" in jobs["retrain"]["needs"]
    (step,) = [s for s in jobs["archive"]["steps"] if "mlflow run" in s.get("run", "")]
    assert "mlflow run . -e archive " in step["run"]
    assert "archive" in yaml.safe_load((REPO_ROOT / "MLproject").read_text())["entry_points"]
