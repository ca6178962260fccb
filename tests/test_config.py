"""The one hyperparameter schema: defaults, coercion, aliases, unknown keys, the README table."""
import os
import re
import warnings

import pytest

from modelscape import config
from modelscape.config import BY_NAME, SCHEMA, ConfigError, canonicalize, check_job_config, readme_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_KEYS = ("ONLINE", "N_SAMPLES", "N_TRAIN", "N_TEST", "ONLYTHRESHOLDS", "NUM_TRIALS", "MAX_ITER", "LR", "DEPTH",
             "WIDTH", "GAMMA", "DEVICES", "SEED", "LOSS_CHECKPOINTS", "EMA_SMOOTHER", "DETERMINISTIC", "VERBOSE")


def canon(cfg, consumers=()):
    """canonicalize, returning (config, [warning messages])."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = canonicalize(cfg, consumers)
    return out, [str(x.message) for x in w]


# --- the schema itself -------------------------------------------------------------------------------------

def test_schema_holds_every_seed_hyperparameter_with_the_seed_defaults():
    seed_defaults = dict(ONLINE=True, N_SAMPLES=1024, N_TRAIN=4000, N_TEST=10_000, ONLYTHRESHOLDS=True,
                         NUM_TRIALS=1, MAX_ITER=100_000, LR=1e-2, DEPTH=2, WIDTH=8192, GAMMA=1.0, DEVICES=[0],
                         SEED=42, LOSS_CHECKPOINTS=[0.15, 0.1], EMA_SMOOTHER=0.9, DETERMINISTIC=True,
                         VERBOSE=False)
    assert set(SEED_KEYS) <= set(BY_NAME)
    d = config.defaults()
    for k, v in seed_defaults.items():
        assert d[k] == v and type(d[k]) is type(v), k
    assert len(BY_NAME) == len(SCHEMA)  # no duplicate names


def test_every_default_passes_its_own_coercion():
    for hp in SCHEMA:
        assert config.coerce(hp.name, hp.default) == hp.default, hp.name


def test_defaults_returns_fresh_copies():
    d = config.defaults()
    d["LOSS_CHECKPOINTS"].append(0.0)
    d["OPTIMIZER_KWARGS"]["x"] = 1
    assert config.defaults()["LOSS_CHECKPOINTS"] == [0.15, 0.1]
    assert config.defaults()["OPTIMIZER_KWARGS"] == {}
    assert BY_NAME["LOSS_CHECKPOINTS"].default == [0.15, 0.1]


@pytest.mark.parametrize("name,value,expected", [
    ("MAX_ITER", "1e5", 100_000), ("MAX_ITER", 1e3, 1000), ("MAX_ITER", "10_000", 10_000),
    ("ONLINE", "false", False), ("ONLINE", "True", True), ("ONLINE", 0, False),
    ("LR", "0.5", 0.5), ("LR", 1, 1.0),
    ("LOSS_CHECKPOINTS", 0.2, [0.2]), ("LOSS_CHECKPOINTS", (0.2, "0.1"), [0.2, 0.1]),
    ("WIDTH", [64, "128"], [64, 128]),  # a sweepable key keeps a list of values
    ("PARAMETERIZATION", "ntp", "ntp"),
])
def test_coerce_converts(name, value, expected):
    out = config.coerce(name, value)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize("name,value", [
    ("MAX_ITER", 1.5), ("MAX_ITER", "many"), ("MAX_ITER", True), ("ONLINE", "maybe"), ("ONLINE", 2),
    ("LR", "fast"), ("LR", True), ("PARAMETERIZATION", "mupp"), ("OPTIMIZER_KWARGS", "momentum"),
    ("LOSS_CHECKPOINTS", ["a"]),
])
def test_coerce_rejects_bad_values_naming_the_key(name, value):
    with pytest.raises(ConfigError, match=name):
        config.coerce(name, value)


def test_canonicalize_reports_bad_values_naming_the_key():
    with pytest.raises(ConfigError, match="EMA_SMOOTHER"):
        canonicalize({"EMA_SMOOTHER": "smooth"})


def test_check_job_config():
    ok = config.defaults()
    check_job_config(ok)
    for key, bad, needle in [("WIDTH", [32, 64], "WIDTH"), ("DEPTH", 0, "DEPTH"), ("GAMMA", 0.0, "GAMMA"),
                             ("EMA_SMOOTHER", 1.0, "EMA_SMOOTHER"), ("MAX_ITER", 0, "MAX_ITER"),
                             ("LOSS_CHECKPOINTS", [], "LOSS_CHECKPOINTS")]:
        with pytest.raises(ConfigError, match=needle):
            check_job_config({**ok, key: bad})


# --- aliases and unknown keys ------------------------------------------------------------------------------

@pytest.mark.parametrize("alias,name,value", [("N_TRIAN", "N_TRAIN", 123), ("DETERMINSITIC", "DETERMINISTIC", False),
                                              ("width", "WIDTH", 48), ("depth", "DEPTH", 3)])
def test_aliases_are_read_with_a_warning(alias, name, value):
    out, msgs = canon({alias: value})
    assert out[name] == value
    assert alias not in out
    assert any(alias in m and name in m for m in msgs), msgs


def test_alias_and_canonical_with_different_values_is_an_error():
    with pytest.raises(ConfigError, match="N_TRIAN.*N_TRAIN|N_TRAIN.*N_TRIAN"):
        canon({"N_TRIAN": 10, "N_TRAIN": 20})
    with pytest.raises(ConfigError, match="width"):
        canon({"width": 16, "WIDTH": 32})
    # the same value twice, or the canonical key at its default (as base_args() leaves it), is fine
    assert canon({"N_TRIAN": 10, "N_TRAIN": 10})[0]["N_TRAIN"] == 10
    assert canon({**config.defaults(), "width": 16})[0]["WIDTH"] == 16


@pytest.mark.parametrize("typo,meant", [("WIDHT", "WIDTH"), ("Lr", "LR"), ("EMA_SMOOTH", "EMA_SMOOTHER"),
                                        ("MAX_ITERS", "MAX_ITER"), ("lossCheckpoints", "LOSS_CHECKPOINTS"),
                                        ("n_trian", "N_TRAIN")])
def test_typos_of_schema_keys_are_errors_naming_key_and_suggestion(typo, meant):
    with pytest.raises(ConfigError) as e:
        canon({typo: 1})
    assert repr(typo) in str(e.value) and repr(meant) in str(e.value)


def test_close_matches_puts_the_best_first():
    assert config.close_matches("WIDHT")[0] == "WIDTH"
    assert config.close_matches("N_TRIAN")[0] == "N_TRAIN"
    assert config.close_matches("datasethps") == []


def test_a_suggestion_is_named_once_even_when_an_alias_matches_too():
    # WIDHT is one edit from WIDTH and from its alias width: one schema name, suggested once
    assert config.close_matches("WIDHT") == ["WIDTH"]
    with pytest.raises(ConfigError) as e:
        canon({"WIDHT": 16})
    assert "did you mean 'WIDTH'?" in str(e.value) and "(or" not in str(e.value)


def test_user_keys_named_by_a_consumer_pass_silently():
    def model_cls(d_in, width, WIDHT_SCALE=1.0, **kwargs):
        pass

    def base_bfn(bsz, gen, X, y, N_TOT=100, datasethps=None, **kwargs):
        pass

    def grab(model, X_tr, y_tr, X_te, y_te, opt, Lr=None, **kwargs):  # a grab may name a key close to LR
        pass

    cfg = {"WIDHT_SCALE": 2.0, "N_TOT": 5, "datasethps": {"a": 1}, "Lr": 0.3, "WIDTH": 16}
    out, msgs = canon(cfg, consumers=[model_cls, base_bfn, grab])
    assert msgs == []
    assert out["N_TOT"] == 5 and out["datasethps"] == {"a": 1} and out["Lr"] == 0.3 and out["WIDHT_SCALE"] == 2.0
    assert out["LR"] == BY_NAME["LR"].default and out["WIDTH"] == 16


def test_keys_absorbed_only_by_kwargs_are_not_named():
    def base_bfn(bsz, gen, X, y, **kwargs):
        pass

    with pytest.raises(ConfigError, match="WIDHT"):
        canon({"WIDHT": 3}, consumers=[base_bfn])
    out, msgs = canon({"N_TOT": 5}, consumers=[base_bfn])
    assert len(msgs) == 1 and "N_TOT" in msgs[0]


def test_keys_close_to_nothing_pass_with_one_warning_listing_them():
    out, msgs = canon({"N_TOT": 5, "datasethps": {"k": 2}, "CLASSES": 10, "WIDTH": 32})
    assert out["N_TOT"] == 5 and out["datasethps"] == {"k": 2} and out["CLASSES"] == 10 and out["WIDTH"] == 32
    assert len(msgs) == 1, msgs
    assert all(k in msgs[0] for k in ("N_TOT", "datasethps", "CLASSES"))


def test_reserved_and_silent_keys():
    grab = lambda **kw: 0  # noqa: E731
    cls = type("M", (), {})
    out, msgs = canon({"otherreturns": {"g": grab}, "X_te": [1.0], "y_te": [2.0], "MODEL_CLASS": cls})
    assert msgs == []
    assert out["MODEL"] is cls and out["otherreturns"] == {"g": grab} and out["X_te"] == [1.0]


def test_canonicalize_fills_defaults_and_does_not_touch_its_input():
    cfg = {"WIDTH": "64", "LOSS_CHECKPOINTS": 0.5}
    out, msgs = canon(cfg)
    assert out["WIDTH"] == 64 and out["LOSS_CHECKPOINTS"] == [0.5]
    assert set(BY_NAME) <= set(out)
    assert cfg == {"WIDTH": "64", "LOSS_CHECKPOINTS": 0.5}


# --- the README table --------------------------------------------------------------------------------------

def _table_rows():
    rows = {}
    for line in readme_table().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0].strip("`")] = cells
    return rows


def test_readme_table_lists_every_name_type_and_default():
    rows = _table_rows()
    assert list(rows) == [hp.name for hp in SCHEMA]
    for hp in SCHEMA:
        name, typ, default, desc = rows[hp.name]
        assert re.search(r"\b" + hp.type.__name__ + r"\b", typ), (hp.name, typ)
        assert ("list" in typ) == hp.is_list and ("sweepable" in typ) == hp.sweepable, hp.name
        assert default == f"`{hp.default!r}`", hp.name
        assert hp.help in desc
        for a in hp.aliases:
            assert a in desc


def test_readme_embeds_the_generated_table():
    path = os.path.join(REPO, "README.md")
    with open(path, encoding="utf-8") as f:  # a missing README fails here: it is no reason to skip
        text = f.read()
    assert readme_table() in text, ("README.md's hyperparameter table differs from config.readme_table(); "
                                    "`python -m modelscape.config README.md` rewrites it")
