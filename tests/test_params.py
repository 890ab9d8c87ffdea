import dataclasses
from pathlib import Path

import pytest

from stages.params import Params, ParamsError, load_params, params_from_dict
from tests.conftest import REPO_ROOT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_repository_params_file_loads_and_matches_defaults():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params == Params()
    assert params.data.source == "digits"
    assert params.backbone.name == "tf_efficientnet_lite0"
    assert params.finetune.enabled is False


def test_missing_keys_take_defaults_and_given_keys_are_typed(tmp_path):
    params = load_params(write(tmp_path, "seed: 7\nhead:\n  C: 2\n"))
    assert params.seed == 7
    assert params.head.C == 2.0 and isinstance(params.head.C, float)
    assert params.head.max_iter == Params().head.max_iter


def test_unknown_key_lists_valid_keys_and_suggests(tmp_path):
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, "head:\n  c: 0.1\n"))
    message = str(err.value)
    assert "unknown key 'head.c'" in message
    assert "did you mean 'head.C'" in message
    assert "C, max_iter, class_weight" in message


def test_unknown_section_lists_top_level_keys():
    expected = "unknown key 'backbon'.*valid keys in top level: seed, data"
    with pytest.raises(ParamsError, match=expected):
        params_from_dict({"backbon": {"name": "x"}})


@pytest.mark.parametrize(("raw", "expected"), [
    ({"head": {"C": 0}}, r"head.C=0 is out of range; allowed: auto or a number in \(0.0, inf\]"),
    ({"head": {"C": -1.5}}, r"head.C=-1.5 is out of range"),
    ({"data": {"test_size": 0.9}}, r"data.test_size=0.9 is out of range; allowed: \(0.0, 0.5\]"),
    ({"backbone": {"batch_size": 0}}, r"batch_size=0 is out of range; allowed: auto or a number "
                                      r"in \[1, 65536\]"),
    ({"backbone": {"batch_size": "max"}}, r"batch_size='max' is not valid; expected auto or a "
                                          r"number in \[1, 65536\]"),
    ({"head": {"C": "autoo"}}, r"^params: head.C='autoo' is not valid; expected auto or a number "
                               r"in \(0.0, inf\]$"),
    ({"head": {"C": "nan"}}, r"head.C='nan' is out of range"),
    ({"head": {"alpha": "none"}}, r"head.alpha='none' is not valid; expected auto or a number in "
                                  r"\[0.0, 100.0\]"),
    ({"backbone": {"mean": [0.5, 0.5]}}, r"backbone.mean=\[0.5, 0.5\] has the wrong type; "
                                         r"expected a list of 3 numbers or null"),
    ({"finetune": {"strategy": "some"}}, r"finetune.strategy='some' is not valid; choose one of: "
                                         r"head, last_k, full, scratch"),
    ({"head": {"class_weight": "equal"}}, r"choose one of: null, balanced"),
    ({"head": {"max_iter": 10.5}}, r"head.max_iter=10.5 has the wrong type; expected int"),
    ({"finetune": {"enabled": "yes please"}}, r"finetune.enabled='yes please' has the wrong type"),
    ({"seed": True}, r"seed=True has the wrong type"),
    ({"head": [1, 2]}, r"'head' must be a mapping"),
])
def test_bad_values_name_the_key_and_what_is_allowed(raw, expected):
    with pytest.raises(ParamsError, match=expected):
        params_from_dict(raw)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "seed: 1\nhead:\n  C: 1.0\n   max_iter: [3\n")
    with pytest.raises(ParamsError, match=r"params.yaml line 4, column \d+: invalid YAML"):
        load_params(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="nowhere.yaml: cannot read"):
        load_params(tmp_path / "nowhere.yaml")


def test_exponent_without_dot_is_read_as_a_float():
    # PyYAML reads 1e-4 as a string; `dvc exp run -S finetune.lr=1e-4` writes exactly that.
    assert params_from_dict({"finetune": {"lr": "1e-4"}}).finetune.lr == pytest.approx(1e-4)
    with pytest.raises(ParamsError, match="finetune.lr='fast' has the wrong type"):
        params_from_dict({"finetune": {"lr": "fast"}})


def test_the_head_chooses_its_regularisation_unless_given_a_number():
    assert Params().head.C == "auto" and Params().head.alpha == "auto"
    assert params_from_dict({"head": {"C": "1e-3", "alpha": 0}}).head == dataclasses.replace(
        Params().head, C=0.001, alpha=0.0)
    assert params_from_dict({"head": {"C": 2}}).head.C == 2.0


def test_lists_and_auto_values_are_typed():
    params = params_from_dict({"backbone": {"mean": [0, 0.5, 1], "batch_size": 16}})
    assert params.backbone.mean == (0.0, 0.5, 1.0)
    assert params.backbone.batch_size == 16
    assert Params().backbone.batch_size == "auto"


def test_determinism_is_off_by_default_and_read_as_a_bool():
    assert Params().backbone.deterministic is False
    assert params_from_dict({"backbone": {"deterministic": True}}).backbone.deterministic is True
    with pytest.raises(ParamsError, match="backbone.deterministic='yes' has the wrong type"):
        params_from_dict({"backbone": {"deterministic": "yes"}})


def test_empty_file_gives_defaults(tmp_path):
    assert load_params(write(tmp_path, "")) == Params()


def every_key():
    """(section, field) for every parameter, section None for top-level keys."""
    for f in dataclasses.fields(Params):
        value = getattr(Params(), f.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                yield f.name, sub.name
        else:
            yield None, f.name


@pytest.mark.parametrize(("section", "key"), list(every_key()))
def test_every_key_with_a_wrong_type_is_named(section, key):
    wrong = {"nested": "mapping"}  # no parameter accepts a mapping
    raw = {section: {key: wrong}} if section else {key: wrong}
    name = f"{section}.{key}" if section else key
    with pytest.raises(ParamsError) as err:
        params_from_dict(raw)
    message = str(err.value)
    assert f"{name}={{'nested': 'mapping'}} has the wrong type; expected" in message
    assert "\n" not in message


def test_a_wrong_value_fails_the_stage_with_one_line_and_no_output(tmp_path):
    from tests.conftest import run_stage_cli

    (tmp_path / "params.yaml").write_text("backbone:\n  precision: float8\n")
    result = run_stage_cli("extract", tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: backbone.precision='float8' is not valid; choose one of: "
        "float32, bfloat16"]
    assert list(tmp_path.iterdir()) == [tmp_path / "params.yaml"]
