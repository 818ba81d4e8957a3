"""Recipes: every shipped recipe loads; types, ranges, relations, paths and overrides are checked
with one-line messages naming file and key; dump/load round-trips; the docs cover every key."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from smdlm_cli.core.config import (SECTIONS, DataConfig, ModelConfig, Recipe, SoftMaskConfig,
                                   TrainConfig)
from smdlm_cli.core.errors import UserError
from smdlm_cli.recipe import dump_recipe, load_recipe, recipe_docs

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "recipes").glob("*.toml"))
TRAIN_KEYS = ", ".join(f.name for f in dataclasses.fields(TrainConfig))
SHAPE = ("expected section.key=value, for example train.steps=100 "
         "(tables: model, data, softmask, train, finetune)")


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error(path, overrides=()) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- shipped recipes and a full one --------------------------------------------------------------

@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipe_loads_and_round_trips(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # local paths in recipes are relative to the working directory
    recipe = load_recipe(path.relative_to(ROOT))
    assert isinstance(recipe, Recipe)
    again = write(tmp_path, dump_recipe(recipe))
    assert load_recipe(again) == recipe


def test_full_recipe_in_every_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"text": "x"}\n')
    path = write(tmp_path, """
# smdlm pretrain r.toml
[model]
preset = "small"
length = 128
dropout = 0.0

[data]
source = "corpus.jsonl"
tokenizer = "gpt2"
valid_fraction = 0.5

[softmask]
enabled = false
k = 1
scale = 1e-6
centre = 0.0

[train]
steps = 1
lr = 1
betas = [0, 0.95]
schedule = "cosine"
t_min = 1e-5
t_max = 1.0
micro_batch_size = 32
""")
    r = load_recipe(path)
    assert r.model == ModelConfig(preset="small", length=128, dropout=0.0)
    assert r.data == DataConfig(source="corpus.jsonl", tokenizer="gpt2", valid_fraction=0.5)
    assert r.softmask == SoftMaskConfig(enabled=False, k=1, scale=1e-6, centre=0.0)
    assert (r.train.steps, r.train.schedule, r.train.t_min) == (1, "cosine", 1e-5)
    assert r.train.micro_batch_size == 32
    # ints in number keys become floats, so downstream code never sees an int learning rate
    assert type(r.train.lr) is float and r.train.lr == 1.0
    assert r.train.betas == [0.0, 0.95] and all(type(b) is float for b in r.train.betas)
    assert r.train.batch_size == TrainConfig().batch_size  # keys left out keep their defaults


def test_empty_recipe_is_all_defaults(tmp_path):
    assert load_recipe(write(tmp_path, "")) == Recipe()


def test_hub_names_are_not_checked_as_paths(tmp_path):
    r = load_recipe(write(tmp_path, '[model]\ninit = "kuleshov-group/mdlm-owt"\n'
                                    '[data]\nsource = "openwebtext"\ntokenizer = "gpt2"\n'))
    assert r.model.init == "kuleshov-group/mdlm-owt"
    assert (r.data.source, r.data.tokenizer) == ("openwebtext", "gpt2")


# ---- file-level errors ---------------------------------------------------------------------------

def test_missing_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./recipes here
    path = tmp_path / "nope.toml"
    assert error(path) == f"recipe not found: {path}"
    (tmp_path / "b.toml").write_text("")
    (tmp_path / "a.toml").write_text("")
    assert error(path) == f"recipe not found: {path}; recipes in {tmp_path}/: a.toml, b.toml"


def test_directory_as_recipe(tmp_path):
    assert error(tmp_path) == f"{tmp_path}: is a directory, expected a TOML recipe file"


def test_not_utf8(tmp_path):
    path = tmp_path / "r.toml"
    path.write_bytes(b'[data]\nsource = "\xff"\n')
    assert error(path) == f"{path}: not UTF-8 text (byte 17)"


def test_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path, "[train]\nsteps = 3\nlr = = 1\n")
    assert error(path) == f"{path}: TOML syntax error at line 3, column 6: Invalid value"


def test_duplicate_key_is_a_syntax_error(tmp_path):
    path = write(tmp_path, "[train]\nsteps = 3\nsteps = 4\n")
    assert error(path).startswith(f"{path}: TOML syntax error at ")


def test_unknown_table(tmp_path):
    path = write(tmp_path, "[trian]\nsteps = 3\n")
    assert error(path) == (f"{path}: unknown table [trian] (known: model, data, softmask, train, finetune); "
                           f"did you mean train?")


def test_unknown_key(tmp_path):
    path = write(tmp_path, "[softmask]\nkk = 3\n")
    assert error(path) == (f"{path}: unknown key softmask.kk (known: enabled, k, prob, scale, "
                           f"centre, steepness, temperature, lr); did you mean softmask.k?")


def test_unknown_key_suggests_the_close_one_only_when_there_is_one(tmp_path):
    path = write(tmp_path, "[train]\nstepz = 3\n")
    assert error(path) == (f"{path}: unknown key train.stepz (known: {TRAIN_KEYS}); "
                           f"did you mean train.steps?")
    path = write(tmp_path, "[train]\nxyzzy = 3\n")
    assert error(path) == f"{path}: unknown key train.xyzzy (known: {TRAIN_KEYS})"


def test_key_outside_any_table(tmp_path):
    path = write(tmp_path, "steps = 3\n")
    assert error(path) == (f"{path}: key steps is outside any table; keys belong in a table "
                           f"(known: model, data, softmask, train, finetune)")


def test_table_name_used_as_key(tmp_path):
    path = write(tmp_path, "train = 3\n")
    assert error(path) == f"{path}: train = 3, expected a table [train]"


# ---- types and ranges, from the field metadata ---------------------------------------------------

@pytest.mark.parametrize("table, line, expected", [
    ("train", 'steps = "ten"', 'train.steps = "ten", expected an integer >= 1'),
    ("train", "steps = 10.0", "train.steps = 10.0, expected an integer >= 1"),
    ("train", "steps = true", "train.steps = true, expected an integer >= 1"),
    ("train", "steps = 0", "train.steps = 0, expected an integer >= 1"),
    ("train", "steps = {n = 1}", "train.steps = {'n': 1}, expected an integer >= 1"),
    ("train", "lr = -1.0", "train.lr = -1.0, expected a number >= 0"),
    ("train", "lr = true", "train.lr = true, expected a number >= 0"),
    ("train", "lr = nan", "train.lr = nan, expected a number >= 0"),
    ("train", "lr = inf", "train.lr = inf, expected a number >= 0"),
    ("train", 'lr = "1e-3"', 'train.lr = "1e-3", expected a number >= 0'),
    ("train", "t_min = 0.0", "train.t_min = 0.0, expected a number in (0, 1]"),
    ("train", "t_max = 1.5", "train.t_max = 1.5, expected a number in (0, 1]"),
    ("train", 'schedule = "linear"',
     'train.schedule = "linear", expected one of "constant", "cosine"'),
    ("train", "schedule = 1", 'train.schedule = 1, expected one of "constant", "cosine"'),
    ("train", 'betas = "0.9"', 'train.betas = "0.9", expected a list of numbers'),
    ("train", 'betas = [0.9, "x"]', 'train.betas = [0.9, "x"], expected a list of numbers'),
    ("train", "betas = [0.9, true]", "train.betas = [0.9, true], expected a list of numbers"),
    ("softmask", "enabled = 1", "softmask.enabled = 1, expected a boolean"),
    ("softmask", 'enabled = "false"', 'softmask.enabled = "false", expected a boolean'),
    ("softmask", "steepness = 0.0", "softmask.steepness = 0.0, expected a number > 0"),
    ("softmask", "centre = 0.5", "softmask.centre = 0.5, expected a number <= 0"),
    ("softmask", "prob = 1.01", "softmask.prob = 1.01, expected a number in [0, 1]"),
    ("data", "source = 3", "data.source = 3, expected a string"),
    ("data", "valid_fraction = 0", "data.valid_fraction = 0, expected a number in (0, 0.5]"),
    ("data", "vocab_size = 257", "data.vocab_size = 257, expected an integer >= 258"),
    ("model", 'preset = "huge"',
     'model.preset = "huge", expected one of "tiny", "small", "medium"'),
    ("model", "dropout = 0.95", "model.dropout = 0.95, expected a number in [0, 0.9]"),
])
def test_wrong_type_or_range(tmp_path, table, line, expected):
    path = write(tmp_path, f"[{table}]\n{line}\n")
    assert error(path) == f"{path}: {expected}"


@pytest.mark.parametrize("table, key, value", [
    ("train", "steps", 1), ("train", "lr", 0.0), ("train", "t_max", 1.0), ("train", "ema", 0.0),
    ("data", "valid_fraction", 0.5), ("softmask", "centre", 0.0), ("softmask", "prob", 1.0),
    ("model", "dropout", 0.9), ("data", "vocab_size", 258),
])
def test_range_ends_are_accepted(tmp_path, table, key, value):
    path = write(tmp_path, f"[{table}]\n{key} = {value!r}\n")
    assert getattr(getattr(load_recipe(path), table), key) == value


# ---- relations between keys ----------------------------------------------------------------------

@pytest.mark.parametrize("lines, expected", [
    ("t_min = 0.5\nt_max = 0.5", "train.t_min = 0.5, expected a number < train.t_max (0.5)"),
    ("t_min = 0.9\nt_max = 0.2", "train.t_min = 0.9, expected a number < train.t_max (0.2)"),
    ("betas = [0.9]", "train.betas = [0.9], expected 2 numbers in [0, 1)"),
    ("betas = [0.9, 0.99, 0.999]",
     "train.betas = [0.9, 0.99, 0.999], expected 2 numbers in [0, 1)"),
    ("betas = [0.9, 1.0]", "train.betas = [0.9, 1.0], expected 2 numbers in [0, 1)"),
    ("betas = [-0.1, 0.9]", "train.betas = [-0.1, 0.9], expected 2 numbers in [0, 1)"),
    ("batch_size = 8\nmicro_batch_size = 16",
     "train.micro_batch_size = 16, expected 0 or an integer <= train.batch_size (8)"),
])
def test_relations(tmp_path, lines, expected):
    path = write(tmp_path, f"[train]\n{lines}\n")
    assert error(path) == f"{path}: {expected}"


def test_micro_batch_equal_to_batch_is_fine(tmp_path):
    r = load_recipe(write(tmp_path, "[train]\nbatch_size = 8\nmicro_batch_size = 8\n"))
    assert (r.train.batch_size, r.train.micro_batch_size) == (8, 8)


def test_relation_error_names_the_override_that_broke_it(tmp_path):
    path = write(tmp_path, "[train]\nt_max = 0.5\n")
    assert error(path, ["train.t_min=0.6"]) == (
        "--set train.t_min=0.6: train.t_min = 0.6, expected a number < train.t_max (0.5)")


def test_override_may_repair_a_relation_of_the_file(tmp_path):
    path = write(tmp_path, "[train]\nt_min = 0.6\nt_max = 0.5\n")
    assert error(path) == f"{path}: train.t_min = 0.6, expected a number < train.t_max (0.5)"
    r = load_recipe(path, ["train.t_max=0.9"])
    assert (r.train.t_min, r.train.t_max) == (0.6, 0.9)


# ---- local paths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("table, key, value", [
    ("data", "source", "./nope.jsonl"), ("data", "source", "nope.parquet"),
    ("data", "source", "../nope"),
    ("data", "tokenizer", "tok/tokenizer.json"), ("model", "init", "/no/such/run"),
    ("model", "init", "weights.safetensors"), ("data", "source", "~/no-such-corpus.txt"),
])
def test_missing_local_path(tmp_path, monkeypatch, table, key, value):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    path = write(tmp_path, f'[{table}]\n{key} = "{value}"\n')
    assert error(path) == f'{path}: {table}.{key} = "{value}": no such file or directory'


def test_local_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "corpus.txt").write_text("hello\n")
    (tmp_path / "recipes").mkdir()
    path = write(tmp_path / "recipes", '[data]\nsource = "./corpus.txt"\n')
    monkeypatch.chdir(tmp_path / "work")
    assert load_recipe(path).data.source == "./corpus.txt"  # kept as written
    monkeypatch.chdir(tmp_path / "recipes")
    assert "no such file or directory" in error(path)


def test_home_directory_paths_expand(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "runs" / "a").mkdir(parents=True)
    assert load_recipe(write(tmp_path, '[model]\ninit = "~/runs/a"\n')).model.init == "~/runs/a"


# ---- --set overrides -----------------------------------------------------------------------------

@pytest.mark.parametrize("override, table, key, value", [
    ("train.steps=100", "train", "steps", 100),
    ("train.lr=1e-3", "train", "lr", 1e-3),
    ("train.lr=2", "train", "lr", 2.0),
    ("softmask.enabled=false", "softmask", "enabled", False),
    ("train.betas=[0.9,0.95]", "train", "betas", [0.9, 0.95]),
    ("train.betas = [0.5, 0.5]", "train", "betas", [0.5, 0.5]),
    ("data.source=openwebtext", "data", "source", "openwebtext"),
    ("data.source=Skylion007/openwebtext", "data", "source", "Skylion007/openwebtext"),
    ('data.source="quoted"', "data", "source", "quoted"),
    ("data.split=train[:-100000]", "data", "split", "train[:-100000]"),
    ("data.subset=20231101", "data", "subset", "20231101"),  # string key: the text typed
    ("data.subset=2023-11-01", "data", "subset", "2023-11-01"),
    ("data.subset=", "data", "subset", ""),
    ("train.schedule=cosine", "train", "schedule", "cosine"),
])
def test_override_values(tmp_path, override, table, key, value):
    r = load_recipe(write(tmp_path, "[train]\nsteps = 5\n"), [override])
    got = getattr(getattr(r, table), key)
    assert got == value and type(got) is type(value)


def test_override_with_a_newline_stays_one_line(tmp_path):
    # "1\nx = 2" would parse as two TOML keys: it is text, and the message quotes it on one line
    assert error(write(tmp_path, ""), ["train.steps=1\nx = 2"]) == (
        "--set 'train.steps=1\\nx = 2': train.steps = \"1\\nx = 2\", expected an integer >= 1")


def test_later_override_wins_and_others_stay(tmp_path):
    path = write(tmp_path, "[train]\nsteps = 5\nlr = 0.1\n")
    r = load_recipe(path, ["train.steps=6", "train.steps=7"])
    assert (r.train.steps, r.train.lr) == (7, 0.1)


@pytest.mark.parametrize("override, expected", [
    ("train.stepz=3", f"unknown key train.stepz (known: {TRAIN_KEYS}); did you mean train.steps?"),
    ("trian.steps=3",
     "unknown table [trian] (known: model, data, softmask, train, finetune); did you mean train?"),
    ("train.steps=ten", 'train.steps = "ten", expected an integer >= 1'),
    ("train.steps=1.5", "train.steps = 1.5, expected an integer >= 1"),
    ("train.lr=-1", "train.lr = -1, expected a number >= 0"),
    ("softmask.enabled=yes", 'softmask.enabled = "yes", expected a boolean'),
    ("train.schedule=linear", 'train.schedule = "linear", expected one of "constant", "cosine"'),
    ("train.betas=0.9", "train.betas = 0.9, expected a list of numbers"),
    ("train.betas=[0.9]", "train.betas = [0.9], expected 2 numbers in [0, 1)"),
    ("data.source=./nope.jsonl", 'data.source = "./nope.jsonl": no such file or directory'),
    ("train.steps", SHAPE), ("steps=3", SHAPE), ("train.=3", SHAPE), ("=3", SHAPE),
])
def test_override_errors_name_the_override(tmp_path, monkeypatch, override, expected):
    monkeypatch.chdir(tmp_path)
    assert error(write(tmp_path, ""), [override]) == f"--set {override}: {expected}"


# ---- writing -------------------------------------------------------------------------------------

def tricky_recipe() -> Recipe:
    return Recipe(
        model=ModelConfig(preset="medium", length=4, dropout=0.9, init=""),
        data=DataConfig(subset='quote " back \\ nl \n tab \t bell \x07 del \x7f é 漢',
                        split="train[:-1]", valid_fraction=1e-300),
        softmask=SoftMaskConfig(scale=5e-324, centre=-0.0, steepness=1e16, temperature=0.1 + 0.2),
        train=TrainConfig(steps=10**12, lr=1e-6, betas=[0.0, 0.999999999], t_min=1e-3, t_max=1.0,
                          schedule="cosine", antithetic=False),
    )


@pytest.mark.parametrize("recipe", [Recipe(), tricky_recipe()], ids=["defaults", "tricky"])
def test_dump_load_round_trip(tmp_path, recipe):
    text = dump_recipe(recipe, header="smdlm pretrain r.toml")
    assert load_recipe(write(tmp_path, text)) == recipe
    # every float comes back bit-exact, not just approximately
    assert repr(load_recipe(write(tmp_path, text)).softmask) == repr(recipe.softmask)


def test_dump_has_every_key_under_its_doc(tmp_path):
    text = dump_recipe(Recipe(), header="smdlm pretrain r.toml\nsecond line")
    lines = text.splitlines()
    assert lines[:3] == ["# smdlm pretrain r.toml", "# second line", ""]
    assert tomllib.loads(text).keys() == SECTIONS.keys()
    for name, cls in SECTIONS.items():
        block = lines[lines.index(f"[{name}]") + 1:]
        for f in dataclasses.fields(cls):
            i = next(j for j, line in enumerate(block) if line.startswith(f"{f.name} = "))
            assert block[i - 1] == f"# {f.metadata['doc']}"
    assert tomllib.loads(text)["train"]["betas"] == [0.9, 0.999]
    assert "scale = 1e-06" in lines


def test_dump_without_header_starts_with_first_table():
    assert dump_recipe(Recipe()).startswith("[model]\n")


def test_dump_rejects_values_toml_cannot_hold():
    with pytest.raises(TypeError):
        dump_recipe(Recipe(data=DataConfig(source=None)))


def test_recipe_docs_cover_every_key():
    docs = recipe_docs()
    for name, cls in SECTIONS.items():
        assert f"### [{name}]" in docs
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in docs
    rows = [line for line in docs.splitlines() if line.startswith("| `")]
    assert len(rows) == sum(len(dataclasses.fields(c)) for c in SECTIONS.values())
    assert "| `steps` | integer >= 1 | `1000` | optimizer steps |" in docs
    assert "| `t_min` | number in (0, 1] | `0.001` | lowest diffusion time sampled in training |" \
        in docs
    assert '| `schedule` | one of "constant", "cosine" | `"constant"` |' in docs


def test_docs_recipes_md_is_up_to_date():
    path = Path(__file__).parents[1] / "docs" / "recipes.md"
    assert path.read_text() == recipe_docs(), "regenerate docs/recipes.md (see recipe_docs)"
