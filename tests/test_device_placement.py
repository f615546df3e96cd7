"""A device-parametrised case makes every tensor on its device.

The "cuda-emu" cases run on CPU tensors, so a tensor made without `device=` in a test that
takes a `device` argument passes there and on the CPU, and fails only on a GPU ("Expected
all tensors to be on the same device"): 150 CUDA cases failed that way on the first GPU
run. This check reads the suite's source instead. In every function with a `device`
parameter (and the functions nested in it), each call to a torch tensor factory must
either name its device (`device=...`) or be moved at once: the factory's value flows,
through arithmetic, indexing and method calls only, into `.to(<device or tensor>)` or
`.cuda()`. A tensor that must stay on the host says so with `# host tensor` on its line.
"""
from __future__ import annotations

import ast
import glob
import os

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
FACTORIES = {"tensor", "as_tensor", "randn", "rand", "randint", "randperm", "zeros", "ones", "full", "empty",
             "arange", "linspace", "logspace", "eye", "tril_indices", "triu_indices", "normal", "bernoulli"}
# Nodes a value passes through unchanged in device: arithmetic, indexing, method chains.
PASS_THROUGH = (ast.BinOp, ast.UnaryOp, ast.Subscript, ast.Attribute, ast.Call, ast.Compare, ast.IfExp)
OPT_OUT = "# host tensor"


def _is_torch_factory(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch")


def _names_device(call: ast.Call) -> bool:
    return any(k.arg == "device" for k in call.keywords)


def _moves_to_device(call: ast.Call) -> bool:
    """`.to(...)` with a device or a tensor (not a dtype alone), or `.cuda()`."""
    if not isinstance(call.func, ast.Attribute):
        return False
    if call.func.attr == "cuda":
        return True
    if call.func.attr != "to":
        return False
    if any(k.arg == "device" for k in call.keywords):
        return True
    for arg in call.args:
        is_dtype = isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name) and arg.value.id == "torch"
        if not is_dtype and not (isinstance(arg, ast.Name) and arg.id == "dtype"):
            return True
    return False


def _moved_at_once(node: ast.AST, parents: dict) -> bool:
    """Walk up from the factory call while the value flows into its parent expression."""
    child = node
    parent = parents.get(child)
    while isinstance(parent, PASS_THROUGH):
        if isinstance(parent, ast.Call):
            if parent.func is not child and not (isinstance(parent.func, ast.Attribute) and parent.func.value is child):
                return False  # an argument of another call: the callee decides
            if _moves_to_device(parent):
                return True
        child, parent = parent, parents.get(parent)
    return False


def _device_functions(tree: ast.AST):
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = fn.args.args + fn.args.kwonlyargs + fn.args.posonlyargs
            if any(a.arg == "device" for a in args):
                yield fn


def find_unplaced_tensors(source: str, filename: str = "<source>") -> list:
    """'file:line: torch.NAME(...)' for each factory call in a device-parametrised function
    that neither names its device nor is moved at once."""
    tree = ast.parse(source, filename)
    lines = source.splitlines()
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for fn in _device_functions(tree):
        for node in ast.walk(fn):
            if not _is_torch_factory(node) or _names_device(node) or _moved_at_once(node, parents):
                continue
            if OPT_OUT in lines[node.lineno - 1]:
                continue
            found.add(f"{os.path.basename(filename)}:{node.lineno}: torch.{node.func.attr}(...) in {fn.name}()")
    return sorted(found)


def test_every_device_parametrised_case_places_its_tensors():
    problems = []
    for path in sorted(glob.glob(os.path.join(TESTS, "*.py"))):
        with open(path) as f:
            problems += find_unplaced_tensors(f.read(), path)
    assert not problems, "tensors made without device= in device-parametrised code:\n" + "\n".join(problems)


@pytest.mark.parametrize("snippet, flagged", [
    ("def t(device):\n    w = torch.randn(3)\n", True),                       # the bug of the first GPU run
    ("def t(device):\n    w = torch.randn(3, device=device)\n", False),
    ("def t(device):\n    w = torch.randn(3, dtype=torch.float64).to(device)\n", False),
    ("def t(device):\n    w = (torch.randn(3) * 2 + 1).to(device=device, dtype=dtype)\n", False),
    ("def t(device):\n    w = torch.randn(3).to(torch.float64)\n", True),     # a dtype alone moves nothing
    ("def t(device):\n    w = f(torch.randn(3))\n", True),
    ("def t(device):\n    def g():\n        return torch.zeros(2)\n", True),  # nested helpers too
    ("def t(device):\n    w = torch.zeros(2)  # host tensor\n", False),
    ("def t(dtype):\n    w = torch.randn(3)\n", False),                       # not device-parametrised
    ("def t(device):\n    w = x.new_zeros(3) + torch.randn(3).cuda()\n", False),
])
def test_the_check_itself(snippet, flagged):
    assert bool(find_unplaced_tensors(snippet)) is flagged
