"""The op contracts live in one package (molmoe/ops), which the model, the backend switch and the
kernels all import: each kernel's `<op>_ref` is the contract's own function object, no module
of molmoe.ops imports the switch or a kernel, and the switch only chooses."""
import ast
import importlib
import pathlib

import pytest

import molmoe.backends as backends
import molmoe.ops as ops

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = ("attention", "decode_attention", "moe_ffn", "apply_rope", "patch_pool")
KERNEL_OF = {"attention": "attention", "decode_attention": "decode_attention", "moe_ffn": "moe",
             "apply_rope": "rope", "patch_pool": "patch_pool"}


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("op", OPS)
def test_kernel_ref_is_the_contracts_function(op):
    kernel = importlib.import_module(f"molmoe.kernels.{KERNEL_OF[op]}")
    ref = getattr(ops, f"{op}_ref")
    assert getattr(kernel, f"{op}_ref") is ref
    assert getattr(ops.REFERENCE_OPS, op) is ref
    assert ref.__module__.startswith("molmoe.ops.")  # defined there, not re-bound from elsewhere
    assert ref.__name__ == f"{op}_ref"


def test_nothing_imports_the_switch_for_references():
    # The kernels and molmoe.ops never import molmoe.backends; the model takes its op set and
    # contract types from molmoe.ops (the switch only picks the backend).
    for path in list((ROOT / "kernels").glob("*.py")) + list((ROOT / "molmoe" / "ops").glob("*.py")):
        mods = imported_modules(path)
        assert "molmoe.backends" not in mods, path
        if path.parent.name == "ops":
            assert not any(m.startswith("molmoe.kernels") for m in mods), path
    for name in ("decoder.py", "vision.py"):
        assert "molmoe.backends" not in imported_modules(ROOT / "molmoe" / "model" / name)


def test_the_switch_only_chooses():
    # molmoe/backends.py defines no op: its functions are the backend/device choice.
    tree = ast.parse((ROOT / "molmoe" / "backends.py").read_text())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert defined == {"Backend", "resolve_device", "select_backend", "_triton_ops", "ops_for"}
    assert backends.ops_for("reference") is ops.REFERENCE_OPS
