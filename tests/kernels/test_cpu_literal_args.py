"""No jitted kernel passes a literal constant to another jitted function that numba compiles on its own.

numba specialises a jitted callee on literal arguments: ``f(a, 0)`` in one kernel and ``f(a, n)`` in another compile
``f`` twice, once for ``Literal[int](0)`` and once for ``int64``, and a loop counter that starts at a literal (``t =
0`` then ``t += nt``) compiles the callee for both types, as typing resolves the call before the loop's back edge.
In a cold numba cache these second compiles took about 30 s of the test suite's 300 s of compiling (twenty-fourth
session), so constants are passed as ``np.int64(0)`` / ``np.bool_(True)``. This test finds the cases statically: a
call, inside a jitted function, of a jitted function of the package (not inlined at numba's level, not an intrinsic)
with an ``int``, ``bool`` or ``float`` constant among its arguments, or a name that the caller assigns such a
constant anywhere (stricter than needed: a name set to literals in both branches of an ``if`` is typed ``int64``
where they merge, but the rule stays simple). Planted calls of each kind are found.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "npconv"
FILES = sorted([*(PKG / "kernels" / "cpu").glob("*.py"), *(PKG / "functional").glob("*.py")])


def _jit_kind(fn):
    """'jit' for a function decorated ``numba.njit(...)`` / ``njit(...)``, 'inline' when it has
    ``inline="always"``, None otherwise (plain functions, intrinsics, overloads)."""
    for d in fn.decorator_list:
        call = d if isinstance(d, ast.Call) else None
        target = call.func if call is not None else d
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
        if name in ("njit", "jit"):
            inline = call is not None and any(k.arg == "inline" and isinstance(k.value, ast.Constant) and
                                              k.value.value == "always" for k in call.keywords)
            return "inline" if inline else "jit"
    return None


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]


def _is_literal(node):
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
    return isinstance(node, ast.Constant) and type(node.value) in (int, bool, float)


def _literal_names(fn):
    """Names that ``fn`` assigns a literal constant somewhere (``t = 0``, ``first = True``): passed on, such a name
    is typed as the literal where typing meets the call first (a loop counter before its back edge)."""
    out = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and _is_literal(node.value):
            out.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and node.value is not None and _is_literal(node.value):
            if isinstance(node.target, ast.Name):
                out.add(node.target.id)
    return out


def literal_calls(sources):
    """(file, line, callee, argument) of every literal argument in a jitted function's call of a compiled jitted
    function, a constant or a name the function assigns a constant; ``sources``: {name: source text}."""
    trees = {name: ast.parse(text) for name, text in sources.items()}
    compiled = {f.name for t in trees.values() for f in _functions(t) if _jit_kind(f) == "jit"}
    found = []
    for name, tree in trees.items():
        for fn in _functions(tree):
            if _jit_kind(fn) is None:
                continue
            lit_names = _literal_names(fn)
            for call in ast.walk(fn):
                if not isinstance(call, ast.Call):
                    continue
                f = call.func
                callee = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if callee not in compiled:
                    continue
                for arg in [*call.args, *(k.value for k in call.keywords)]:
                    if _is_literal(arg) or (isinstance(arg, ast.Name) and arg.id in lit_names):
                        found.append((name, call.lineno, callee, ast.unparse(arg)))
    return found


def test_no_literal_arguments_between_jitted_functions():
    found = literal_calls({str(p.relative_to(PKG.parent)): p.read_text() for p in FILES})
    assert not found, ("literal constants passed to jitted functions (each compiles the callee once more; pass "
                       f"np.int64(...) / np.bool_(...)): {found}")


@pytest.mark.parametrize("call, hit", [
    ("g(a, 0)", True), ("g(a, -1)", True), ("g(a, True)", True), ("g(a, 1.5)", True), ("g(a, n=0)", True),
    ("g(a, np.int64(0))", False), ("g(a, np.bool_(True))", False), ("g(a, None)", False), ("h(a, 0)", False),
    ("m.g(a, 0)", True), ("k(a, 0)", False), ("g(a, t0)", True), ("g(a, t1)", False), ("g(a, t1 + 0)", False),
])
def test_literal_calls_are_found(call, hit):
    src = f'''
import numba
@numba.njit(cache=True)
def g(a, n):
    return a
@numba.njit(inline="always")
def k(a, n):
    return a
def h(a, n):
    return a
@numba.njit(parallel=True)
def caller(a):
    t0 = 0                # a counter started at a literal
    t1 = np.int64(0)
    t0 += 1
    t1 += 1
    return {call}
def python_side(a):
    return g(a, 0)        # from Python an int is typed int64: not a literal
'''
    found = literal_calls({"m.py": src})
    assert bool(found) == hit, found
