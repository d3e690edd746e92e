"""The loader: YAML with a source map, `extends:` parents and `--set` overrides."""

from __future__ import annotations

import pytest

from malt.compiler.api import check
from malt.compiler.diagnostics import Origin, RecipeError
from malt.compiler.loader import load

BASE = """\
name: base
model:
  d_model: 64
  n_layers: 2
  n_heads: 4
tokenizer: {kind: bytes}
data:
  sources:
    - {name: docs, path: docs.txt, weight: 0.7}
    - {name: code, path: code.txt, weight: 0.3}
optimizer: {lr: 3e-4, betas: [0.9, 0.95]}
train:
  seq_len: 32
  global_batch: 8
  steps: 10
"""


@pytest.fixture
def d(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs.txt").write_text("some prose\n")
    (tmp_path / "code.txt").write_text("def f(): pass\n")
    (tmp_path / "base.yaml").write_text(BASE)
    return tmp_path


def diagnostics(path, sets=None):
    with pytest.raises(RecipeError) as info:
        check(path, sets)
    return info.value.diagnostics


# ---- source map -------------------------------------------------------------------------

def test_source_map_block_and_flow(d):
    loaded = load("base.yaml")
    assert loaded.file == "base.yaml"
    assert loaded.origins[("name",)] == Origin("base.yaml", 1, 1)
    assert loaded.origins[("model", "n_heads")] == Origin("base.yaml", 5, 3)
    assert loaded.origins[("tokenizer", "kind")] == Origin("base.yaml", 6, 13)
    assert loaded.origins[("data", "sources", 1)] == Origin("base.yaml", 10, 7)
    assert loaded.origins[("data", "sources", 1, "weight")] == Origin("base.yaml", 10, 36)
    assert loaded.origins[("optimizer", "betas", 1)] == Origin("base.yaml", 11, 36)
    # a path without its own entry falls back to its closest ancestor, and the root to line 1
    assert loaded.origin(("model", "d_ff")) == Origin("base.yaml", 2, 1)
    assert loaded.origin(()) == Origin("base.yaml", 1, 1)
    assert loaded.base_dir == d.resolve()


def test_values_are_plain_yaml(d):
    tree = load("base.yaml").tree
    assert tree["model"] == {"d_model": 64, "n_layers": 2, "n_heads": 4}
    assert tree["optimizer"] == {"lr": "3e-4", "betas": [0.9, 0.95]}   # 3e-4 stays text until the schema reads it
    assert tree["data"]["sources"][1] == {"name": "code", "path": "code.txt", "weight": 0.3}


# ---- extends ----------------------------------------------------------------------------

def test_extends_child_wins_mappings_merge_lists_replace(d):
    (d / "child.yaml").write_text(
        "extends: base.yaml\n"
        "name: child\n"
        "model:\n"
        "  n_layers: 6\n"
        "data:\n"
        "  sources:\n"
        "    - {name: code, path: code.txt}\n"
        "optimizer: {betas: [0.8, 0.9]}\n")
    loaded = load("child.yaml")
    t = loaded.tree
    assert "extends" not in t
    assert t["name"] == "child"                                              # child wins
    assert t["model"] == {"d_model": 64, "n_layers": 6, "n_heads": 4}       # mappings merge
    assert t["data"]["sources"] == [{"name": "code", "path": "code.txt"}]   # lists replace
    assert t["optimizer"] == {"lr": "3e-4", "betas": [0.8, 0.9]}
    assert t["train"]["steps"] == 10                                         # untouched sections come from the parent
    # every value keeps the file and line it finally comes from
    assert loaded.origins[("model", "n_layers")] == Origin("child.yaml", 4, 3)
    assert loaded.origins[("model", "d_model")] == Origin("base.yaml", 3, 3)
    assert loaded.origins[("data", "sources", 0, "name")] == Origin("child.yaml", 7, 8)
    assert ("data", "sources", 1) not in loaded.origins                      # the parent's second source is gone
    assert loaded.origins[("train", "steps")] == Origin("base.yaml", 15, 3)
    r, _ = check("child.yaml")
    assert r.model.n_layers == 6 and [s.name for s in r.data.sources] == ["code"]


def test_extends_chain_and_relative_paths(d):
    (d / "sub").mkdir()
    (d / "sub" / "mid.yaml").write_text("extends: ../base.yaml\nmodel: {n_heads: 2}\n")
    (d / "sub" / "leaf.yaml").write_text("extends: mid.yaml\ntrain: {steps: 20}\n")
    loaded = load("sub/leaf.yaml")
    assert loaded.tree["model"]["n_heads"] == 2 and loaded.tree["train"]["steps"] == 20
    assert loaded.tree["train"]["seq_len"] == 32
    assert loaded.origins[("model", "n_heads")] == Origin("sub/mid.yaml", 2, 9)
    assert loaded.origins[("train", "seq_len")] == Origin("base.yaml", 13, 3)


def test_paths_in_a_parent_stay_relative_to_the_parent(d):
    """A parent in another folder keeps naming its own files: its relative paths are rebased for the child."""
    (d / "sub").mkdir()
    (d / "sub" / "own.txt").write_text("the child's own source\n")
    (d / "tok.json").write_text("{}")
    (d / "base.yaml").write_text(BASE.replace("tokenizer: {kind: bytes}", "tokenizer: {kind: file, path: tok.json}")
                                 .replace("path: code.txt,", "path: code.txt, validation_path: docs.txt,")
                                 + "init_from: runs/base\nphases:\n  - {name: a, share: 50%, data: {sources: "
                                   "[{name: p, path: docs.txt}, {name: q, path: 'builtin:python-docs'}, {name: r, path: /abs/x.txt}]}}\n"
                                   "  - {name: b, share: 50%}\n")
    (d / "sub" / "leaf.yaml").write_text("extends: ../base.yaml\nname: leaf\n")
    tree = load("sub/leaf.yaml").tree
    assert [s["path"] for s in tree["data"]["sources"]] == ["../docs.txt", "../code.txt"]
    assert tree["data"]["sources"][1]["validation_path"] == "../docs.txt"
    assert tree["tokenizer"]["path"] == "../tok.json" and tree["init_from"] == "../runs/base"
    assert [s["path"] for s in tree["phases"][0]["data"]["sources"]] == ["../docs.txt", "builtin:python-docs", "/abs/x.txt"]
    # the child's own paths are its own; a parent in the same folder is left as written
    (d / "sub" / "leaf2.yaml").write_text("extends: ../base.yaml\ndata: {sources: [{name: own, path: own.txt}]}\n")
    assert load("sub/leaf2.yaml").tree["data"]["sources"] == [{"name": "own", "path": "own.txt"}]
    (d / "same.yaml").write_text("extends: base.yaml\n")
    assert load("same.yaml").tree["data"]["sources"][0]["path"] == "docs.txt"


def test_a_recipe_extending_one_in_another_folder_checks_and_compiles(d):
    (d / "sub").mkdir()
    (d / "sub" / "leaf.yaml").write_text("extends: ../base.yaml\nname: leaf\n")
    recipe, loaded = check("sub/leaf.yaml")
    assert [s.path for s in recipe.data.sources] == ["../docs.txt", "../code.txt"]
    assert all((loaded.base_dir / s.path).is_file() for s in recipe.data.sources)


def test_extends_a_child_may_replace_a_section_by_a_scalar_and_is_told(d):
    (d / "child.yaml").write_text("extends: base.yaml\nmodel: 3\n")
    [diag] = diagnostics("child.yaml")
    assert diag.format().startswith("child.yaml:2:1: error: model: expected a section (a mapping of keys), got 3")


def test_extends_missing_parent(d):
    (d / "child.yaml").write_text("name: x\nextends: nothere.yaml\n")
    [diag] = diagnostics("child.yaml")
    assert diag.format() == ("child.yaml:2:1: error: extends: parent recipe not found: nothere.yaml (looked in nothere.yaml)\n"
                             "    hint: extends: paths are relative to the recipe that names them")


def test_extends_not_a_path(d):
    (d / "child.yaml").write_text("extends: [base.yaml]\n")
    [diag] = diagnostics("child.yaml")
    assert diag.format().startswith("child.yaml:1:1: error: extends: expected the path of a parent recipe")


def test_extends_cycle_points_at_the_extends_line(d):
    (d / "a.yaml").write_text("extends: b.yaml\n")
    (d / "b.yaml").write_text("name: b\nextends: a.yaml\n")
    [diag] = diagnostics("a.yaml")
    assert diag.format() == ("b.yaml:2:1: error: extends: extends cycle: a.yaml -> b.yaml -> a.yaml\n"
                             "    hint: remove one of the extends: lines")
    (d / "self.yaml").write_text("extends: self.yaml\n")
    assert "extends cycle: self.yaml -> self.yaml" in diagnostics("self.yaml")[0].message


# ---- --set ------------------------------------------------------------------------------

def test_set_scalars_list_index_flow_values_and_null(d):
    loaded = load("base.yaml", ["train.steps=100", "data.sources.0.weight=0.5", "optimizer.betas=[0.9, 0.99]",
                                "optimizer.lr=1e-3", "model.n_kv_heads=2", "model.n_kv_heads=null", "name=run 2"])
    t = loaded.tree
    assert t["train"]["steps"] == 100
    assert t["data"]["sources"][0] == {"name": "docs", "path": "docs.txt", "weight": 0.5}
    assert t["optimizer"]["betas"] == [0.9, 0.99]
    assert t["optimizer"]["lr"] == "1e-3"
    assert t["model"]["n_kv_heads"] is None      # later --set wins; null is YAML's None
    assert t["name"] == "run 2"
    assert loaded.origins[("data", "sources", 0, "weight")] == Origin("command line", command_line="data.sources.0.weight=0.5")
    assert str(loaded.origin(("optimizer", "betas", 1))) == "command line (--set optimizer.betas=[0.9, 0.99])"
    r, _ = check("base.yaml", ["optimizer.betas=[0.9, 0.99]", "data.sources.0.weight=0.5", "optimizer.lr=1e-3"])
    assert r.optimizer.betas == (0.9, 0.99) and r.data.sources[0].weight == 0.5 and r.optimizer.lr == pytest.approx(1e-3)


def test_set_replaces_a_whole_list_and_creates_sections(d):
    loaded = load("base.yaml", ["data.sources=[{name: code, path: code.txt}]", "schedule.warmup=10"])
    assert loaded.tree["data"]["sources"] == [{"name": "code", "path": "code.txt"}]
    assert ("data", "sources", 1) not in loaded.origins
    assert loaded.tree["schedule"] == {"warmup": 10}
    assert loaded.origin(("schedule",)).command_line == "schedule.warmup=10"


def test_set_applies_after_extends(d):
    (d / "child.yaml").write_text("extends: base.yaml\ntrain: {steps: 20}\n")
    r, _ = check("child.yaml", ["train.steps=30"])
    assert r.train.steps == 30


def test_set_does_not_touch_the_file(d):
    load("base.yaml", ["train.steps=99"])
    assert (d / "base.yaml").read_text() == BASE


@pytest.mark.parametrize("text, message, hint", [
    ("train.steps", "--set expects path=value, got 'train.steps'", "for example --set train.steps=100"),
    ("train..steps=3", "--set path 'train..steps' has an empty component", "dotted keys"),
    ("=3", "--set path '' has an empty component", "dotted keys"),
    ("data.sources.5.weight=1", "data.sources is a list of 2 item(s); 5 is not one of its indices", "list indices start at 0"),
    ("data.sources.x=1", "data.sources is a list of 2 item(s); 'x' is not one of its indices", "list indices start at 0"),
    ("name.first=1", "name is not a section, so it has no key 'first'", "--set can only reach into sections"),
    ("model.d_model.x=1", "model.d_model is not a section, so it has no key 'x'", "--set can only reach into sections"),
])
def test_bad_set(d, text, message, hint):
    with pytest.raises(RecipeError) as info:
        load("base.yaml", [text])
    [diag] = info.value.diagnostics
    assert diag.message == message
    assert hint in diag.hint
    assert str(diag.origin) == f"command line (--set {text})"


def test_bad_sets_are_all_reported(d):
    with pytest.raises(RecipeError) as info:
        load("base.yaml", ["a", "train.steps=5", "b"])
    assert [dg.message for dg in info.value.diagnostics] == ["--set expects path=value, got 'a'", "--set expects path=value, got 'b'"]


def test_set_value_that_is_not_yaml_is_kept_as_text(d):
    """Text YAML cannot read stays text; an unclosed bracket or quote (meant as YAML) is an error."""
    assert load("base.yaml", ["name=@oops"]).tree["name"] == "@oops"
    assert load("base.yaml", ["name="]).tree["name"] == ""
    with pytest.raises(RecipeError, match="is not valid YAML"):
        load("base.yaml", ["name=[oops"])


# ---- YAML that is valid but not a recipe ---------------------------------------------------------

def test_tags_recursive_aliases_and_merge_keys_are_problems_not_crashes(d):
    (d / "r.yaml").write_text("name: !!python/name:os.system\nseed: !!int abc\nmodel: &m {d_model: *m}\ntrain:\n  <<: {steps: 1}\n")
    formatted = [dg.format() for dg in diagnostics("r.yaml")]
    assert [f.split(": error: ")[0] for f in formatted] == ["r.yaml:1:7", "r.yaml:2:7", "r.yaml:3:8", "r.yaml:5:3"]
    assert "cannot read this value: could not determine a constructor for the tag" in formatted[0]
    assert "cannot read this value: invalid literal for int()" in formatted[1]
    assert "a YAML alias refers to a value that contains it" in formatted[2]
    assert "YAML merge keys (<<) are not supported\n    hint: use `extends: parent.yaml`" in formatted[3]


def test_plain_aliases_are_fine(d):
    (d / "r.yaml").write_text(BASE.replace("global_batch: 8", "global_batch: &b 8\n  micro_batch: *b"))
    r, _ = check("r.yaml")
    assert r.train.micro_batch == 8
