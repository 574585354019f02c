"""A block's ``forward`` compiled again with the residual adds before its norms fused into them.

Transformer blocks (Llama's decoder layer, GPT-2's block, CLIP's, ViT's, Whisper's, BART's and
DistilBERT's layers, ... 432 classes in transformers 5.25) write the step into a norm the same few ways,
whatever else their forward does; the pre-norm one::

    hidden_states = residual + hidden_states      # T = A + B
    residual = hidden_states                      # R = T
    hidden_states = self.post_attention_layernorm(hidden_states)   # T = self.N(T)

(the other spellings: ``_add_then_norm``, ``_Fuse.visit_Call``; across an optional branch:
``_sink_into_branch``).
Rather than match each class's whole forward (their attention calls, caches and outputs differ
by class and by transformers release), ``fused_forward`` rewrites those statements, and nothing
else, in the syntax tree of the class's own source into one::

    hidden_states, residual = self._normfuse_add_norm("post_attention_layernorm", residual, hidden_states)

and compiles it again with the class's globals, defaults and decorators' wrappers: the rest of
the forward is the class's own code. ``A`` and ``B`` are evaluated in the same order as before;
the method (``patch``'s) computes ``(N(A + B), A + B)`` fused where the operands allow (the same
dtype and shape; the floating-point add commutes, so the fused ``B + A`` is the same sum) and
unfused otherwise. This module only transforms code; what the method does is ``patch``'s.
"""

from __future__ import annotations

import ast
import copy
import dis
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass

FUSED_METHOD = "_normfuse_add_norm"


@dataclass(frozen=True)
class _AddThenNorm:
    """``statements[i:i + length]`` compute ``out = self.<norm>(A + B)`` and keep the sum in
    ``kept`` (None: the sum is not kept)."""

    length: int
    out: str
    kept: str | None
    norm: str


def _add_then_norm(statements: list[ast.stmt], i: int, self_name: str) -> _AddThenNorm | None:
    """The add-then-norm at ``statements[i]``, in one of three spellings::

        T = A + B; R = T; T = self.N(T)    # pre-norm: the sum goes on as the residual R
        T = A + B; U = self.N(T)           # pre-norm: the sum goes on as T, the norm is U
        T = A + B; T = self.N(T)           # post-norm (BART's, DETR's encoder layers): the sum
                                           # is not kept; A or B must be the name ``residual``
    """
    add = statements[i]
    if not _assigns_a_sum(add):
        return None
    target = add.targets[0].id
    following = statements[i + 1 : i + 3]
    if len(following) == 2 and all(map(_assigns_a_name, following)):
        keep, norm = following
        if (
            isinstance(keep.value, ast.Name) and keep.value.id == target and keep.targets[0].id != target
            and norm.targets[0].id == target and _norm_of(norm.value, target, self_name)
        ):  # fmt: skip
            return _AddThenNorm(3, target, keep.targets[0].id, _norm_of(norm.value, target, self_name))
    if following and _assigns_a_name(following[0]) and (name := _norm_of(following[0].value, target, self_name)):
        out = following[0].targets[0].id
        if out != target:
            return _AddThenNorm(2, out, target, name)
        operands = (add.value.left, add.value.right)
        if any(isinstance(operand, ast.Name) and operand.id == "residual" for operand in operands):
            return _AddThenNorm(2, out, None, name)
    return None


def _assigns_a_name(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.Assign) and len(statement.targets) == 1 and isinstance(statement.targets[0], ast.Name)


def _assigns_a_sum(statement: ast.stmt) -> bool:
    """``T = A + B``."""
    return _assigns_a_name(statement) and isinstance(statement.value, ast.BinOp) and isinstance(statement.value.op, ast.Add)


def _norm_of(call: ast.expr, target: str, self_name: str) -> str | None:
    """N where ``call`` is ``self.N(target)``."""
    if (
        isinstance(call, ast.Call) and not call.keywords and len(call.args) == 1
        and isinstance(call.args[0], ast.Name) and call.args[0].id == target
        and isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name)
        and call.func.value.id == self_name
    ):  # fmt: skip
        return call.func.attr
    return None


@dataclass(frozen=True)
class _Dropout:
    """The dropout statement before an add: ``T = F.dropout(T, p, training)`` (``p`` and
    ``training`` the expressions, or their defaults) or ``T = self.<...dropout...>(T)`` (``module``:
    the attribute, used as a dropout at run time only where it is an ``nn.Dropout``)."""

    p: ast.expr | None
    training: ast.expr | None
    module: ast.expr | None


_FUNCTIONAL = ("nn.functional", "F", "torch.nn.functional", "functional")


def _dropout_of(statement: ast.stmt, self_name: str) -> _Dropout | None:
    if not _assigns_a_name(statement) or not isinstance(call := statement.value, ast.Call):
        return None
    target, func = statement.targets[0].id, call.func
    if not (call.args and isinstance(call.args[0], ast.Name) and call.args[0].id == target):
        return None
    if isinstance(func, ast.Attribute) and func.attr == "dropout" and ast.unparse(func.value) in _FUNCTIONAL:
        # F.dropout(input, p=0.5, training=True, inplace=False)
        parameters = ("p", "training", "inplace")
        if len(call.args) > 1 + len(parameters):
            return None
        given = dict(zip(parameters, call.args[1:]))
        for keyword in call.keywords:
            if keyword.arg not in parameters or keyword.arg in given:
                return None
            given[keyword.arg] = keyword.value
        inplace = given.get("inplace")
        if inplace is not None and not (isinstance(inplace, ast.Constant) and inplace.value is False):
            return None
        return _Dropout(given.get("p", ast.Constant(0.5)), given.get("training", ast.Constant(True)), None)
    if (
        isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == self_name
        and "dropout" in func.attr.lower() and len(call.args) == 1 and not call.keywords
    ):  # fmt: skip
        return _Dropout(None, None, func)
    return None


def _dropped_operand(add: ast.BinOp, target: str) -> int | None:
    """Which operand of ``A + B`` is the dropout's output ``target`` (0 or 1), the other a name."""
    operands = (add.left, add.right)
    if not all(isinstance(operand, ast.Name) for operand in operands):
        return None
    names = [operand.id for operand in operands]
    return names.index(target) if names.count(target) == 1 else None


class _Fuse(ast.NodeTransformer):
    """Replaces, in every statement list, the add-then-norm triples whose norm is in ``names``
    (None: every one); ``fused`` lists the norms' names, in order. With ``with_dropout``, a dropout
    statement just before the add (``T = F.dropout(T, ...); T = residual + T; ...``) joins the
    call; ``dropped_into`` lists the norms whose add takes one."""

    def __init__(self, self_name: str, names: frozenset[str] | None, with_dropout: bool = False):
        self.self_name, self.names, self.fused = self_name, names, []
        self.with_dropout, self.dropped_into = with_dropout, []

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        for field in ("body", "orelse", "finalbody"):
            statements = getattr(node, field, None)
            if isinstance(statements, list) and statements and isinstance(statements[0], ast.stmt):
                setattr(node, field, self._fuse(statements))
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        """``self.N(A + B)`` inside any expression (DistilBERT's ``self.sa_layer_norm(attention_output
        + hidden_states)``, ALBERT's, MPNet's, OpenAI GPT's post-norm steps): the sum not kept."""
        self.generic_visit(node)
        func = node.func
        if not (
            isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == self.self_name
            and len(node.args) == 1 and not node.keywords and isinstance(node.args[0], ast.BinOp)
            and isinstance(node.args[0].op, ast.Add) and _wanted(func.attr, self.names)
        ):  # fmt: skip
            return node
        self.fused.append(func.attr)
        add = node.args[0]
        return ast.copy_location(ast.Subscript(self._call(func.attr, add), ast.Constant(0), ast.Load()), node)

    def _call(self, norm: str, add: ast.BinOp, dropout: _Dropout | None = None, dropped: int = 0) -> ast.Call:
        args = [ast.Constant(norm), add.left, add.right]
        if dropout is not None:
            none = ast.Constant(None)
            args.append(ast.Tuple([ast.Constant(dropped), dropout.p or none, dropout.training or none,
                                   dropout.module or none], ast.Load()))  # fmt: skip
            self.dropped_into.append(norm)
        return ast.Call(
            func=ast.Attribute(value=ast.Name(self.self_name, ast.Load()), attr=FUSED_METHOD, ctx=ast.Load()),
            args=args, keywords=[],
        )  # fmt: skip

    def _with_dropout(self, statements: list[ast.stmt], i: int) -> tuple[_Dropout, int] | None:
        """The dropout at ``statements[i]`` and which operand of the add after it it drops, where
        that add is an add-then-norm of a wanted norm."""
        if not self.with_dropout or i + 1 >= len(statements):
            return None
        dropout = _dropout_of(statements[i], self.self_name)
        add = statements[i + 1]
        if dropout is None or not _assigns_a_sum(add):
            return None
        target = statements[i].targets[0].id
        dropped = _dropped_operand(add.value, target) if add.targets[0].id == target else None
        return None if dropped is None else (dropout, dropped)

    def _fuse(self, statements: list[ast.stmt]) -> list[ast.stmt]:
        out, i = [], 0
        while i < len(statements):
            drop = self._with_dropout(statements, i)
            # the dropout goes along where the add goes into both branches of an ``if``
            sunk = _sink_into_branch(statements, i + (drop is not None), self.self_name, self.names)
            if sunk is not None:
                moved, branch, consumed = sunk
                if drop is not None:
                    branch.body.insert(0, statements[i])
                    branch.orelse.insert(0, copy.deepcopy(statements[i]))
                branch.body, branch.orelse = self._fuse(branch.body), self._fuse(branch.orelse)
                out += [*moved, branch]
                i += consumed + (drop is not None)
                continue
            found = _add_then_norm(statements, i + (drop is not None), self.self_name)
            if found is None or not _wanted(found.norm, self.names):
                out.append(statements[i])
                i += 1
                continue
            dropout, dropped = drop if drop is not None else (None, 0)
            i += drop is not None
            call = self._call(found.norm, statements[i].value, dropout, dropped)
            if found.kept is None:
                fused = ast.Assign(targets=[ast.Name(found.out, ast.Store())], value=ast.Subscript(call, ast.Constant(0), ast.Load()))
            else:
                targets = ast.Tuple([ast.Name(found.out, ast.Store()), ast.Name(found.kept, ast.Store())], ast.Store())
                fused = ast.Assign(targets=[targets], value=call)
            out.append(ast.copy_location(fused, statements[i]))
            self.fused.append(found.norm)
            i += found.length
        return out


def _sink_into_branch(
    statements: list[ast.stmt], i: int, self_name: str, names: frozenset[str] | None
) -> tuple[list[ast.stmt], ast.If, int] | None:
    """Decoder layers with an optional cross-attention (GPT-2's block, Whisper's, MBart's) put an
    ``if`` between the add and the norm::

        T = A + B
        if encoder_hidden_states is not None:
            ...                          # its own norm, attention and add
        R = T
        T = self.N(T)

    The add and the two statements after the ``if`` go into both of its branches, where each is
    an add-then-norm::

        if encoder_hidden_states is not None:
            T = A + B
            ...
            R = T
            T = self.N(T)
        else:
            T = A + B
            R = T
            T = self.N(T)

    Only the test now runs before the add: it must read neither T nor anything with side effects
    (names, ``self``'s attributes, ``is`` / ``is not``, ``not``, ``and`` / ``or``). Assignments of
    constants between the add and the ``if`` (``cross_attn_weights = None``) move before the add
    where the add does not read their names. Returns (the moved statements, the new ``if``, how many
    statements they replace); None where the statements are not of that shape."""
    add = statements[i]
    if not _assigns_a_sum(add):
        return None
    target = add.targets[0].id
    read = {node.id for node in ast.walk(add.value) if isinstance(node, ast.Name)}
    k = i + 1
    while k < len(statements) and _constant_assignment(statements[k], {target} | read):
        k += 1
    if k + 3 > len(statements):
        return None
    branch = statements[k]
    if not (isinstance(branch, ast.If) and not branch.orelse and _side_effect_free(branch.test, target)):
        return None
    tail = statements[k + 1 : k + 3]
    found = _add_then_norm([add, *tail], 0, self_name)
    if found is None or found.length != 3 or not _wanted(found.norm, names):
        return None
    sunk = ast.If(test=branch.test, body=[add, *branch.body, *tail], orelse=copy.deepcopy([add, *tail]))
    return statements[i + 1 : k], ast.copy_location(sunk, branch), k + 3 - i


def _wanted(name: str, names: frozenset[str] | None) -> bool:
    return names is None or name in names


def _constant_assignment(statement: ast.stmt, avoid: set[str]) -> bool:
    return _assigns_a_name(statement) and statement.targets[0].id not in avoid and isinstance(statement.value, ast.Constant)


def _side_effect_free(test: ast.expr, target: str) -> bool:
    for node in ast.walk(test):
        if isinstance(node, ast.Name):
            if node.id == target:
                return False
        elif isinstance(node, ast.Attribute):
            if not isinstance(node.value, ast.Name):
                return False
        elif isinstance(node, ast.Compare):
            if not all(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
                return False
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, ast.Not):
                return False
        elif not isinstance(node, (ast.Constant, ast.BoolOp, ast.expr_context, ast.boolop, ast.cmpop, ast.unaryop)):
            return False
    return True


def _function_tree(function: Callable) -> tuple[ast.FunctionDef, str, int] | None:
    """The function's definition as parsed from its source, its file and first line."""
    try:
        lines, first = inspect.getsourcelines(function)
        # under an ``if`` rather than dedented: a string literal spanning lines (a docstring)
        # keeps its indentation, as in the compiled function
        tree = ast.parse("if 1:\n" + "".join(lines)) if lines[0][:1].isspace() else ast.parse("".join(lines))
        filename = inspect.getsourcefile(function) or "<unknown>"
    except (OSError, TypeError, SyntaxError):
        return None
    if isinstance(tree.body[0], ast.If):
        tree.body = tree.body[0].body
        ast.increment_lineno(tree, first - 2)
    else:
        ast.increment_lineno(tree, first - 1)
    node = tree.body[0] if tree.body else None
    if not isinstance(node, ast.FunctionDef) or node.name != function.__name__:
        return None
    return node, filename, first


def add_norm_names(forward: Callable) -> tuple[str, ...]:
    """The attribute names N of the norms that follow a residual add in ``forward``'s statements
    (``T = A + B; R = T; T = self.N(T)``, also across an optional branch), in order; empty where
    there are none or no source."""
    return scan(forward)[0]


def scan(forward: Callable) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``add_norm_names``, and the norms among them whose add has a dropout statement just before
    it (``fused_forward``'s ``with_dropout`` takes it into the call)."""
    found = _function_tree(inspect.unwrap(forward))
    if found is None or not found[0].args.args:
        return (), ()
    fuse = _Fuse(found[0].args.args[0].arg, None, with_dropout=True)
    fuse.visit(found[0])
    return tuple(fuse.fused), tuple(fuse.dropped_into)


def fused_forward(forward: Callable, names: frozenset[str], owner: type, with_dropout: bool = False) -> Callable | None:
    """``forward`` (a class's, with its decorators) compiled again with the add-then-norm
    statements of the norms ``names`` fused (the module docstring); None where that cannot be done
    exactly: no source, a source that is not what the function was compiled from (the file
    changed since it was imported: its code, compiled again unchanged, must be the function's),
    a closure over anything but ``super()``'s class cell, or a decorator's wrapper that is not a
    plain function holding the function it wraps. ``owner`` is the class defining ``forward``
    (the cell a zero-argument ``super()`` reads); ``with_dropout``: the dropouts just before the
    adds join the calls (``_Fuse``)."""
    chain = [forward]
    while hasattr(chain[-1], "__wrapped__"):
        chain.append(chain[-1].__wrapped__)
    raw = chain[-1]
    if not isinstance(raw, types.FunctionType) or set(raw.__code__.co_freevars) - {"__class__"}:
        return None
    found = _function_tree(raw)
    if found is None or not found[0].args.args:
        return None
    node, filename, _ = found
    again = _compile(copy.deepcopy(node), filename, raw, owner)
    # (Python 3.10 passes nested functions their qualified name as a constant: compared less the
    # enclosing functions' names, which differ)
    prefixes = (f"_normfuse_factory.<locals>.{raw.__name__}.<locals>.", f"{raw.__qualname__}.<locals>.")
    if not _same_code(again.__code__, raw.__code__, prefixes):
        return None
    fuse = _Fuse(node.args.args[0].arg, names, with_dropout)
    fuse.visit(node)
    if not fuse.fused:
        return None
    function = _compile(node, filename, raw, owner)
    # the decorators' wrappers, innermost first, each copied to call the new function instead
    for wrapper, inner in zip(reversed(chain[:-1]), reversed(chain[1:])):
        function = _rewrap(wrapper, inner, function)
        if function is None:
            return None
    return function


def _compile(node: ast.FunctionDef, filename: str, raw: types.FunctionType, owner: type) -> types.FunctionType:
    """The function ``node`` defines, compiled in ``raw``'s globals with ``raw``'s defaults,
    annotations and names, and ``owner`` as ``super()``'s class; decorators are left out."""
    node.decorator_list = []  # the decorators' wrappers are rebuilt around it (fused_forward), not re-run
    node.returns = None
    # annotations and defaults are the original function's objects, set below: evaluated again
    # here they might name what the class body had in scope and the module has not
    for argument in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs, node.args.vararg, node.args.kwarg):
        if argument is not None:
            argument.annotation = None
    node.args.defaults = [ast.Constant(None) for _ in node.args.defaults]
    node.args.kw_defaults = [None if d is None else ast.Constant(None) for d in node.args.kw_defaults]
    # a factory binding ``__class__``, so that ``super()`` inside resolves as in the class body
    factory = ast.FunctionDef(
        name="_normfuse_factory", args=ast.arguments(posonlyargs=[], args=[ast.arg("__class__")], kwonlyargs=[],
        kw_defaults=[], defaults=[]), body=[node, ast.Return(ast.Name(node.name, ast.Load()))], decorator_list=[],
        **({"type_params": []} if "type_params" in ast.FunctionDef._fields else {}),
    )  # fmt: skip
    module = ast.fix_missing_locations(ast.Module(body=[factory], type_ignores=[]))
    namespace: dict = {}
    exec(compile(module, filename, "exec"), raw.__globals__, namespace)  # noqa: S102 (the class's own code, rewritten)
    function = namespace["_normfuse_factory"](owner)
    function.__defaults__, function.__kwdefaults__ = raw.__defaults__, raw.__kwdefaults__
    function.__annotations__ = dict(raw.__annotations__)
    for attribute in ("__module__", "__qualname__", "__doc__"):
        setattr(function, attribute, getattr(raw, attribute))
    function.__dict__.update(raw.__dict__)
    return function


def _same_code(a: types.CodeType, b: types.CodeType, prefixes: tuple[str, str]) -> bool:
    """Whether two code objects hold the same instructions on the same names and constants
    (nested code compared alike; string constants with ``prefixes[0]`` in a's, ``prefixes[1]``
    in b's, as one). Not compared: line numbers, qualified names, flags, jump offsets, and whether
    an attribute call loads a method or an attribute (the compiler loads ``module.f`` as an
    attribute where ``module`` is imported in the same file, and the code compiled again here is
    not in that file's scope)."""
    if (a.co_names, a.co_varnames, a.co_freevars, a.co_cellvars) != (b.co_names, b.co_varnames, b.co_freevars, b.co_cellvars):
        return False
    if _instructions(a, prefixes[0]) != _instructions(b, prefixes[1]) or len(a.co_consts) != len(b.co_consts):
        return False
    for x, y in zip(a.co_consts, b.co_consts):
        if isinstance(x, types.CodeType) and isinstance(y, types.CodeType):
            if not _same_code(x, y, prefixes):
                return False
        elif type(x) is not type(y) or _unprefixed(x, prefixes[0]) != _unprefixed(y, prefixes[1]):
            return False
    return True


def _unprefixed(value: object, prefix: str) -> object:
    return value.replace(prefix, "") if isinstance(value, str) else value


_JUMPS = frozenset(dis.hasjrel) | frozenset(dis.hasjabs)
_LAYOUT = frozenset({"CACHE", "EXTENDED_ARG", "NOP", "PUSH_NULL", "PRECALL", "RESUME"})


def _instructions(code: types.CodeType, prefix: str) -> list[tuple[str, object]]:
    out = []
    for instruction in dis.get_instructions(code):
        name = instruction.opname
        if name in _LAYOUT:
            continue
        name = "LOAD_ATTR" if name == "LOAD_METHOD" else name
        argval = None if instruction.opcode in _JUMPS else _unprefixed(instruction.argval, prefix)
        out.append((name, "<code>" if isinstance(argval, types.CodeType) else argval))  # (compared as constants)
    return out


def _rewrap(wrapper: Callable, old: Callable, new: Callable) -> Callable | None:
    """A copy of the decorator's ``wrapper`` whose closure holds ``new`` where it held ``old``."""
    if not isinstance(wrapper, types.FunctionType) or not wrapper.__closure__:
        return None
    cells, replaced = [], False
    for cell in wrapper.__closure__:
        try:
            held = cell.cell_contents
        except ValueError:  # an empty cell
            held = None
        if held is old:
            cells.append(types.CellType(new))
            replaced = True
        else:
            cells.append(cell)
    if not replaced:
        return None
    copied = types.FunctionType(wrapper.__code__, wrapper.__globals__, wrapper.__name__, wrapper.__defaults__, tuple(cells))
    copied.__kwdefaults__ = wrapper.__kwdefaults__
    copied.__dict__.update(wrapper.__dict__)
    for attribute in ("__module__", "__qualname__", "__doc__", "__annotations__"):
        setattr(copied, attribute, getattr(wrapper, attribute))
    copied.__wrapped__ = new
    return copied
