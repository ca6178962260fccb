"""parse_args (scripts) and base_args (notebooks) agree with the schema."""
import re
import sys

import pytest

from modelscape import config
from modelscape.backend import cli
from modelscape.backend.cli import base_args, build_parser, parse_args
from modelscape.config import SCHEMA, ConfigError


def test_parse_args_and_base_args_hold_every_key_at_its_default():
    parsed, base = vars(parse_args([])), vars(base_args())
    assert parsed == base and set(parsed) == set(config.defaults())
    for hp in SCHEMA:
        # sweepable keys come as a list of axis values, as the original's N_SAMPLES did
        want = [hp.default] if hp.sweepable else hp.default
        assert parsed[hp.name] == want and type(parsed[hp.name]) is type(want), hp.name


def test_base_args_are_fresh_copies():
    a = base_args()
    a.LOSS_CHECKPOINTS.append(1.0)
    assert base_args().LOSS_CHECKPOINTS == [0.15, 0.1]


def test_every_schema_key_is_a_flag_but_those_the_engine_sets():
    opts = {s for a in build_parser()._actions for s in a.option_strings}
    for hp in SCHEMA:
        assert (f"--{hp.name}" in opts) == hp.cli, hp.name
    assert "--JOB_ID" not in opts


def test_parse_args_reads_sys_argv_by_default(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["script.py", "--WIDTH", "96"])
    assert parse_args().WIDTH == [96]


def test_help_shows_every_flag_with_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    entries = {}
    for chunk in re.split(r"\n\s+(?=--[A-Z])", text):
        m = re.match(r"--([A-Z_]+)", chunk)
        if m:
            entries[m.group(1)] = " ".join(chunk.split())
    for hp in (hp for hp in SCHEMA if hp.cli):
        assert hp.name in entries, hp.name
        assert f"(default: {hp.default!r})" in entries[hp.name], (hp.name, entries[hp.name])
        assert hp.help.split(".")[0] in entries[hp.name]


def test_lists_take_several_values():
    a = parse_args(["--LOSS_CHECKPOINTS", "0.1", "0.05", "--DEVICES", "0", "1", "3"])
    assert a.LOSS_CHECKPOINTS == [0.1, 0.05] and a.DEVICES == [0, 1, 3]
    a = parse_args(["--LOSS_CHECKPOINTS", "0.2"])
    assert a.LOSS_CHECKPOINTS == [0.2]  # a list-valued key stays a list with one value


def test_sweepable_keys_give_a_list_for_one_value_too():
    a = parse_args(["--WIDTH", "64", "128", "256", "--LR", "0.1", "1e-3", "--GAMMA", "2"])
    assert a.WIDTH == [64, 128, 256] and a.LR == [0.1, 1e-3]
    assert a.GAMMA == [2.0] and isinstance(a.GAMMA[0], float)
    a = parse_args(["--WIDTH", "64", "--N_SAMPLES", "100"])
    assert a.WIDTH == [64] and type(a.WIDTH[0]) is int and a.N_SAMPLES == [100]


def test_ints_accept_scientific_notation_and_bools_accept_words():
    a = parse_args(["--MAX_ITER", "1e5", "--ONLINE", "false", "--VERBOSE", "True", "--DETERMINISTIC", "0"])
    assert a.MAX_ITER == 100_000 and type(a.MAX_ITER) is int
    assert a.ONLINE is False and a.VERBOSE is True and a.DETERMINISTIC is False
    a = parse_args(["--ONLINE", "yes", "--CENTER=no"])
    assert a.ONLINE is True and a.CENTER is False


def test_strings_choices_and_dicts():
    a = parse_args(["--PARAMETERIZATION", "ntp", "--OPTIMIZER", "AdamW", "--LOSS", "cross_entropy",
                    "--OPTIMIZER_KWARGS", '{"betas": [0.9, 0.95], "eps": 1e-6}', "--EXPT_NAME", "run1"])
    assert a.PARAMETERIZATION == "ntp" and a.OPTIMIZER == "AdamW" and a.LOSS == "cross_entropy"
    assert a.OPTIMIZER_KWARGS == {"betas": [0.9, 0.95], "eps": 1e-6} and a.EXPT_NAME == "run1"
    assert parse_args(["--MODEL_FILE", "m.py"]).MODEL_FILE == "m.py"


@pytest.mark.parametrize("argv,flag", [
    (["--MAX_ITER", "1.5"], "--MAX_ITER"), (["--MAX_ITER", "lots"], "--MAX_ITER"),
    (["--ONLINE", "maybe"], "--ONLINE"), (["--LR", "fast"], "--LR"), (["--WIDTH", "64", "wide"], "--WIDTH"),
    (["--PARAMETERIZATION", "mupp"], "--PARAMETERIZATION"), (["--OPTIMIZER_KWARGS", "{bad"], "--OPTIMIZER_KWARGS"),
    (["--DEVICES"], "--DEVICES"),
])
def test_bad_values_error_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line][0]
    assert flag in err, err


@pytest.mark.parametrize("argv,bad,meant", [(["--WIDHT", "3"], "--WIDHT", "--WIDTH"),
                                            (["--Lr", "0.1"], "--Lr", "--LR"),
                                            (["--Width", "3"], "--Width", "--WIDTH"),
                                            (["--EMA_SMOOTH", "0.5"], "--EMA_SMOOTH", "--EMA_SMOOTHER"),
                                            (["--WIDTH", "3", "--MAX_ITRE=5"], "--MAX_ITRE", "--MAX_ITER")])
def test_unknown_flags_error_suggesting_the_closest_name(argv, bad, meant, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line][0]
    assert bad in err and meant in err, err


def test_unknown_flag_far_from_everything_still_errors(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--WID", "3"])  # no prefix abbreviations: WID is not silently WIDTH
    assert "--WID'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--QWERTYUIOP", "1"])
    assert "QWERTYUIOP" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["stray"])
    assert "stray" in capsys.readouterr().err


def test_seed_misspelt_flags_are_read_with_a_warning():
    with pytest.warns(UserWarning, match="N_TRIAN"):
        a = parse_args(["--N_TRIAN", "77"])
    assert a.N_TRAIN == 77 and "N_TRIAN" not in vars(a) and a.N_TRIAN == 77  # the old name reads the same key
    with pytest.warns(UserWarning, match="DETERMINSITIC"):
        assert parse_args(["--DETERMINSITIC", "false"]).DETERMINISTIC is False


def test_seed_style_backend_import_is_the_same_module():
    from backend.cli import base_args as b2, parse_args as p2
    import backend.cli
    assert p2 is parse_args and b2 is base_args and backend.cli is cli


def test_script_defaults_are_checked_shown_and_overridden_by_flags(capsys):
    from modelscape.backend.cli import build_parser
    args = parse_args([], defaults={"WIDTH": [64, 256], "MAX_ITER": "1e3"})
    assert args.WIDTH == [64, 256] and args.MAX_ITER == 1000 and args.LR == [1e-2]
    args = parse_args(["--WIDTH", "32"], defaults={"WIDTH": [64, 256]})
    assert args.WIDTH == [32]
    assert "(default: [64, 256])" in build_parser({"WIDTH": [64, 256]}).format_help().replace("\n", " ").replace(
        "  ", " ")
    with pytest.raises(ConfigError, match="WIDHT.*WIDTH"):
        parse_args([], defaults={"WIDHT": 3})
