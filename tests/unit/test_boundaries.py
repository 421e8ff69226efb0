"""Layout rules of DESIGN.md: gan/ never imports ray or mlflow, directly or through its dependencies."""

import ast
import subprocess
import sys
from pathlib import Path

GAN = Path(__file__).resolve().parents[2] / "gan"
FORBIDDEN = ("ray", "mlflow")


def test_no_gan_module_imports_ray_or_mlflow():
    offenders = []
    for path in GAN.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders


def test_importing_all_of_gan_loads_neither_ray_nor_mlflow():
    modules = sorted(".".join(p.relative_to(GAN.parent).with_suffix("").parts)
                     for p in GAN.rglob("*.py") if p.name != "__init__.py")
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]\nprint(len({modules!r}))\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=GAN.parent, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 10


def test_the_config_modules_import_each_other_one_way():
    """config_checks <- tune_space, config_model <- config <- config_loader: no cycle, no import hidden in a
    function."""
    allowed = {"config_checks": set(), "tune_space": {"gan.config_checks"}, "config_model": {"gan.config_checks"},
               "config": {"gan.config_checks", "gan.config_model", "gan.tune_space"},
               "config_loader": {"gan.config", "gan.config_checks"}}
    for name, may_import in allowed.items():
        tree = ast.parse((GAN / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("gan")}
        assert imported == may_import, (name, imported)
