"""Load a recipe: YAML with a source map, ``extends:`` parents and ``--set`` overrides.

The result is a plain tree (dicts, lists, scalars) plus a map from each value's
path (a tuple of keys and list indices) to its :class:`Origin`, so that any later
stage can say exactly which file, line and column a problem comes from.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .diagnostics import Diagnostic, Origin, RecipeError

Path_ = tuple  # a path into the tree: ('data', 'sources', 0, 'weight')


@dataclass
class Loaded:
    tree: dict
    origins: dict[Path_, Origin] = field(default_factory=dict)
    file: str = "<recipe>"          # the recipe file as the user named it
    base_dir: Path = Path(".")      # relative paths in the recipe resolve against this
    resuming: bool = False          # malt run --resume: what only a first start reads (init_from) may be gone

    def origin(self, path: Path_) -> Origin | None:
        """The origin of ``path``, or of its closest ancestor that has one."""
        path = tuple(path)
        while True:
            if path in self.origins:
                return self.origins[path]
            # a mapping key written as a number (--set model.0=1) reaches the schema as the text '0'
            alt = tuple(int(p) if isinstance(p, str) and p.isdigit() else p for p in path)
            if alt in self.origins:
                return self.origins[alt]
            if not path:
                return Origin(self.file, 1, 1)
            path = path[:-1]


def display_path(p: Path) -> str:
    """A path as the user would write it: relative to the working directory when inside it."""
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, RuntimeError, OSError):  # outside the working directory, or a symlink loop
        return str(p)


_ODD_INT = re.compile(r"^[-+]?(0[0-7_]+|[0-9][0-9_]*(:[0-5]?[0-9])+)$")  # YAML 1.1 octal (010) and sexagesimal (1:30)


class _Builder:
    """Turns a composed YAML node graph into plain data while recording origins."""

    def __init__(self, file: str):
        self.file = file
        self.constructor = yaml.SafeLoader("")
        self.origins: dict[Path_, Origin] = {}
        self.problems: list[Diagnostic] = []
        self.open: set[int] = set()  # ids of the collection nodes being built, to catch an alias that contains itself

    def at(self, node) -> Origin:
        return Origin(self.file, node.start_mark.line + 1, node.start_mark.column + 1)

    def build(self, node, path: Path_):
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            if id(node) in self.open:
                self.problems.append(Diagnostic(".".join(map(str, path)), "a YAML alias refers to a value that contains it",
                                                self.at(node), hint="recipes cannot be recursive; write the value out instead of *alias"))
                return None
            self.open.add(id(node))
            try:
                return self._collection(node, path)
            finally:
                self.open.discard(id(node))
        if node.tag == "tag:yaml.org,2002:int" and node.style is None and _ODD_INT.match(node.value):
            # YAML 1.1 reads 010 as octal 8 and 1:30 as base 60 (90): almost never what a recipe means
            self.problems.append(Diagnostic(".".join(map(str, path)), f"{node.value} is not a plain number here (YAML reads "
                                            "a leading 0 as octal and a ':' as base 60)", self.at(node),
                                            hint="write the number without a leading 0 or ':' (or quote it if it is text)"))
            return None
        try:
            return self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError) as e:
            self.problems.append(Diagnostic(".".join(map(str, path)), f"cannot read this value: {getattr(e, 'problem', None) or e}",
                                            self.at(node), hint="write plain YAML values; tags such as !!python/... are not allowed"))
            return None

    def _collection(self, node, path: Path_):
        if isinstance(node, yaml.MappingNode):
            out = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    self.problems.append(Diagnostic(".".join(map(str, path)), "mapping keys must be plain names", self.at(key_node),
                                                    hint="write keys as plain words such as d_model"))
                    continue
                key = key_node.value
                if key == "<<":
                    self.problems.append(Diagnostic(".".join(map(str, path)), "YAML merge keys (<<) are not supported",
                                                    self.at(key_node), hint="use `extends: parent.yaml` to inherit from another recipe"))
                    continue
                if key in out:
                    first = self.origins[path + (key,)]
                    self.problems.append(Diagnostic(".".join(map(str, path + (key,))), f"duplicate key {key!r} (first set at line {first.line})",
                                                    self.at(key_node), hint="each key may appear once in a mapping; remove one of them"))
                    continue
                self.origins[path + (key,)] = self.at(key_node)
                out[key] = self.build(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            out = []
            for i, item in enumerate(node.value):
                self.origins[path + (i,)] = self.at(item)
                out.append(self.build(item, path + (i,)))
            return out


def _parse_file(path: Path, shown: str) -> tuple[dict, dict[Path_, Origin]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([Diagnostic("", f"recipe file not found: {shown}", Origin(shown),
                                      hint="check the path; recipes are YAML files such as recipes/tiny.yaml")])
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError([Diagnostic("", f"cannot read recipe: {e}", Origin(shown), hint="a recipe must be a readable UTF-8 YAML file")])
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        origin = Origin(shown, mark.line + 1, mark.column + 1) if mark else Origin(shown)
        msg = f"not valid YAML: {e.problem or e.context}"
        if e.context and e.problem:
            msg = f"not valid YAML: {e.problem} ({e.context})"
        if e.context_mark and e.problem_mark and e.context_mark.line != e.problem_mark.line:
            # where the parser gave up can be far below the cause (an unclosed quote or bracket): say where it began
            msg += f"; the construct it was reading began at line {e.context_mark.line + 1}:{e.context_mark.column + 1}"
        hint = ("indent with spaces: YAML does not allow tabs" if "'\\t'" in msg else
                "a recipe is one YAML document: remove the '---' line and what follows it, or merge it into the first"
                if "another document" in msg else
                "fix the YAML syntax at this line (indentation, a missing ':' or an unclosed quote or bracket)")
        raise RecipeError([Diagnostic("", msg, origin, hint=hint)])
    except yaml.YAMLError as e:
        raise RecipeError([Diagnostic("", f"not valid YAML: {e}", Origin(shown), hint="fix the YAML syntax; see recipes/tiny.yaml for an example")])
    if node is None:
        raise RecipeError([Diagnostic("", "the recipe is empty", Origin(shown),
                                      hint="a recipe needs at least name, model, tokenizer, data, optimizer and train; see docs/recipes.md")])
    builder = _Builder(shown)
    tree = builder.build(node, ())
    if builder.problems:
        raise RecipeError(builder.problems)
    if not isinstance(tree, dict):
        raise RecipeError([Diagnostic("", "a recipe must be a mapping of sections (name:, model:, ...)",
                                      Origin(shown, node.start_mark.line + 1, node.start_mark.column + 1),
                                      hint="start from recipes/tiny.yaml")])
    return tree, builder.origins


# sections with fields that belong to their kind (span_corruption's noise_density, GaLore's rank): a child recipe
# or a --set that switches the kind drops the parent's fields of the other kind; None: every field but kind
KIND_SECTIONS = {("objective",): None, ("optimizer",): ("rank", "update_every", "scale")}


def _drop_kind_fields(section: dict, path: Path_, origins: dict, keep=lambda key: False) -> None:
    """Remove, in place, the fields of ``section`` (at ``path``) that belong to its kind, and their origins; a field
    for which ``keep(key)`` holds stays."""
    own = KIND_SECTIONS[path]
    for key in [k for k in section if k != "kind" and (own is None or k in own) and not keep(k)]:
        section.pop(key)
        for k in [k for k in origins if k[: len(path) + 1] == path + (key,)]:
            del origins[k]


def _switches_kind(path: Path_, parent: dict, child: dict) -> bool:
    return path in KIND_SECTIONS and "kind" in child and child["kind"] != parent.get("kind")


def _merge(parent: dict, child: dict, origins: dict, c_origins: dict, path: Path_ = ()) -> dict:
    """Child wins; mappings merge recursively; lists and scalars replace.

    ``origins`` holds the parent's origins and is updated in place so that every
    value keeps the origin of the file it finally comes from.
    """
    out = dict(parent)
    for key, value in child.items():
        sub = path + (key,)
        if isinstance(value, dict) and isinstance(parent.get(key), dict):
            base = parent[key]
            if _switches_kind(sub, base, value):  # the parent's fields of its own kind are not inherited
                base = dict(base)
                _drop_kind_fields(base, sub, origins)
            out[key] = _merge(base, value, origins, c_origins, sub)
            origins[sub] = c_origins[sub]
            continue
        for k in [k for k in origins if k[: len(sub)] == sub]:
            del origins[k]
        origins.update({k: o for k, o in c_origins.items() if k[: len(sub)] == sub})
        out[key] = value
        # the run's length is one of train.tokens and train.steps: a child that sets one replaces the parent's
        # other (as --set does), instead of failing with both set
        if path == ("train",) and key in ("steps", "tokens") and value is not None:
            other = "tokens" if key == "steps" else "steps"
            if other not in child and out.get(other) is not None:
                out.pop(other)
                origins.pop(path + (other,), None)
    return out


def _rebase_paths(tree: dict, parent_dir: Path, child_dir: Path) -> None:
    """Rewrite the relative file paths of a parent recipe (data sources and their validation files, a
    tokenizer file, init_from, a distillation teacher; also inside phases) so that they still name the same
    files from the child's directory: every path in a recipe is relative to the file that writes it."""
    _map_paths(tree, lambda v: v if os.path.isabs(os.path.expanduser(v)) else os.path.relpath(os.path.normpath(parent_dir / v), child_dir))


def _expand_home(tree: dict) -> None:
    """~ and ~user in the recipe's file paths name home folders, for every command and the generated program."""
    _map_paths(tree, lambda v: os.path.expanduser(v) if v.startswith("~") else v)


def _map_paths(tree: dict, fn) -> None:
    """Apply ``fn`` to each file path the recipe writes (data sources and their validation files, a tokenizer
    file, init_from, a distillation teacher; also inside phases), in place; builtin: sources are not paths."""
    def fix(node: dict, key: str) -> None:
        v = node.get(key)
        if isinstance(v, str) and v and not v.startswith("builtin:"):
            node[key] = fn(v)

    def sources(data) -> None:
        for src in (data.get("sources") if isinstance(data, dict) else None) or []:
            if isinstance(src, dict):
                fix(src, "path")
                fix(src, "validation_path")

    def objective(obj) -> None:
        if isinstance(obj, dict):
            fix(obj, "teacher")

    sources(tree.get("data"))
    objective(tree.get("objective"))
    if isinstance(tree.get("tokenizer"), dict):
        fix(tree["tokenizer"], "path")
    if isinstance(tree.get("init_from"), str):
        fix(tree, "init_from")
    elif isinstance(tree.get("init_from"), dict):
        fix(tree["init_from"], "path")
    for ph in tree.get("phases") if isinstance(tree.get("phases"), list) else []:
        if isinstance(ph, dict):
            sources(ph.get("data"))
            objective(ph.get("objective"))


def load_file(path: str | Path, _chain: tuple = ()) -> Loaded:
    path = Path(path)
    shown = display_path(path)
    try:
        key = path.resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop
        raise RecipeError([Diagnostic("", f"cannot read recipe: {e}", Origin(shown), hint="point at the recipe file itself")])
    tree, origins = _parse_file(path, shown)
    parent_ref = tree.pop("extends", None)
    ext_origin = origins.pop(("extends",), None)
    if parent_ref is not None:
        if not isinstance(parent_ref, str):
            raise RecipeError([Diagnostic("extends", "expected the path of a parent recipe, such as base.yaml", ext_origin,
                                          hint="write `extends: base.yaml` (relative to this recipe)")])
        parent_path = path.parent / os.path.expanduser(parent_ref)  # ~ names the home folder, as in the other paths
        if parent_path.resolve() in _chain + (key,):
            cycle = " -> ".join(display_path(p) for p in _chain + (key, parent_path.resolve()))
            raise RecipeError([Diagnostic("extends", f"extends cycle: {cycle}", ext_origin, hint="remove one of the extends: lines")])
        if parent_path.is_dir():
            raise RecipeError([Diagnostic("extends", f"{parent_ref} is a folder, not a recipe file", ext_origin,
                                          hint="name the parent recipe's .yaml file")])
        if not parent_path.exists():
            raise RecipeError([Diagnostic("extends", f"parent recipe not found: {parent_ref} (looked in {display_path(parent_path)})",
                                          ext_origin, hint="extends: paths are relative to the recipe that names them")])
        parent = load_file(parent_path, _chain + (key,))
        if parent.base_dir != path.resolve().parent:
            _rebase_paths(parent.tree, parent.base_dir, path.resolve().parent)
        p_origins = dict(parent.origins)
        tree = _merge(parent.tree, tree, p_origins, origins)
        origins = p_origins
    return Loaded(tree=tree, origins=origins, file=shown, base_dir=path.resolve().parent)


def _parse_set(text: str):
    if "=" not in text:
        raise RecipeError([Diagnostic("", f"--set expects path=value, got {text!r}", Origin("command line", command_line=text),
                                      hint="for example --set train.steps=100 or --set data.sources.0.weight=0.5")])
    dotted, raw = text.split("=", 1)
    parts = []
    for piece in dotted.strip().split("."):
        if not piece:
            raise RecipeError([Diagnostic("", f"--set path {dotted!r} has an empty component", Origin("command line", command_line=text),
                                          hint="write the path as dotted keys, such as optimizer.lr or data.sources.0.weight")])
        parts.append(int(piece) if piece.isdigit() else piece)
    if _ODD_INT.match(raw.strip()):  # as in a recipe file: YAML 1.1 reads 010 as 8 and 1:30 as 90
        raise RecipeError([Diagnostic(dotted, f"{raw.strip()} is not a plain number here (YAML reads a leading 0 as octal "
                                      "and a ':' as base 60)", Origin("command line", command_line=text),
                                      hint="write the number without a leading 0 or ':' (or quote it if it is text)")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        if raw.strip()[:1] in "\"'[{":  # meant as YAML (a quoted string, a list, a mapping) but not closed
            quote = raw.strip()[:1] in "\"'"
            raise RecipeError([Diagnostic(dotted, f"--set value {raw!r} is not valid YAML: {getattr(e, 'problem', None) or e}",
                                          Origin("command line", command_line=text),
                                          hint="close the " + ("quote; the shell removes one level of quotes, so quote the "
                                                               f"whole argument: --set '{dotted}=\"...\"'" if quote else
                                                               "bracket or brace"))]) from None
        value = raw  # other text YAML cannot read (such as @name) is taken as it is
    return tuple(parts), value


def apply_sets(loaded: Loaded, sets: list[str]) -> Loaded:
    """Apply ``--set a.b=v`` overrides in order; the value is read as a YAML scalar or flow value."""
    problems = []
    for text in sets or []:
        try:
            path, value = _parse_set(text)
        except RecipeError as e:
            problems.extend(e.diagnostics)
            continue
        origin = Origin("command line", command_line=text)
        node = loaded.tree
        problem = None
        for i, part in enumerate(path):
            here = ".".join(map(str, path[:i]))
            if isinstance(node, list):
                if not isinstance(part, int) or part >= len(node):
                    problem = (f"{here} is a list of {len(node)} item(s); {part!r} is not one of its indices",
                               "list indices start at 0, as in data.sources.0.weight")
                    break
            elif not isinstance(node, dict):
                problem = (f"{here} is not a section, so it has no key {part!r}",
                           "--set can only reach into sections (mappings) and into lists by index")
                break
            if i == len(path) - 1:
                break
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
                loaded.origins[path[: i + 1]] = origin  # a section created by --set comes from the command line
            node = node[part]
        if problem:
            problems.append(Diagnostic(".".join(map(str, path)), problem[0], origin, hint=problem[1]))
            continue
        last = path[-1]
        section = tuple(path[:-1])
        if section in KIND_SECTIONS and last == "kind" and isinstance(node, dict) and node.get("kind") != value:
            _drop_kind_fields(node, section, loaded.origins,  # the other kind's fields, not those an earlier --set wrote
                              keep=lambda key: getattr(loaded.origins.get(section + (key,)), "command_line", None))
        node[last] = value
        for k in [k for k in loaded.origins if k[: len(path)] == path]:
            del loaded.origins[k]
        loaded.origins[path] = origin
        # the run's length is one of train.tokens and train.steps: setting one on the command line replaces
        # the other where a file set it (--set train.steps=100 on a recipe that says tokens: 2M)
        if tuple(path) in (("train", "steps"), ("train", "tokens")) and value is not None:
            other = ("train", "tokens" if last == "steps" else "steps")
            if node.get(other[1]) is not None and not getattr(loaded.origins.get(other), "command_line", None):
                node.pop(other[1])
                loaded.origins.pop(other, None)
    if problems:
        raise RecipeError(problems)
    return loaded


def load(path: str | Path, sets: list[str] | None = None) -> Loaded:
    loaded = apply_sets(load_file(path), sets or [])
    _expand_home(loaded.tree)
    return loaded
