import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from transfer.errors import PipelineError
from transfer.params import Params, ParamsError, load_params, params_from_dict


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _keys(cls: type, prefix: str = "") -> set[str]:
    keys = set()
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        keys |= (_keys(hint, f"{prefix}{f.name}.") if dataclasses.is_dataclass(hint)
                 else {f"{prefix}{f.name}"})
    return keys


def _flat(raw: dict, prefix: str = "") -> set[str]:
    return {key for name, value in raw.items()
            for key in (_flat(value, f"{prefix}{name}.") if isinstance(value, dict)
                        else {f"{prefix}{name}"})}


def test_repository_params_file_loads_and_names_every_key():
    # Whatever values a user or `dvc exp run -S` put in it: it stays valid and complete, the
    # reference of every key.
    path = REPO_ROOT / "params.yaml"
    load_params(path)
    assert _flat(yaml.safe_load(path.read_text(encoding="utf-8"))) == _keys(Params)


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
    ({"head": {"C": 0}}, r"head.C=0 is out of range; allowed: auto or a number in \(0.0, inf\)"),
    ({"head": {"C": -1.5}}, r"head.C=-1.5 is out of range"),
    ({"data": {"test_size": 0.9}}, r"data.test_size=0.9 is out of range; allowed: \(0.0, 0.5\]"),
    ({"data": {"val_size": 0.5, "test_size": 0.5}}, r"data.val_size=0.5 and data.test_size=0.5 "
                                                    r"leave no image for training; their sum "
                                                    r"must be below 1"),
    ({"backbone": {"batch_size": 0}}, r"batch_size=0 is out of range; allowed: auto or a number "
                                      r"in \[1, 65536\]"),
    ({"backbone": {"batch_size": "max"}}, r"batch_size='max' is not valid; expected auto or a "
                                          r"number in \[1, 65536\]"),
    ({"head": {"C": "autoo"}}, r"^params: head.C='autoo' is not valid; expected auto or a number "
                               r"in \(0.0, inf\)$"),
    ({"head": {"C": "nan"}}, r"head.C='nan' is not a finite number"),
    ({"head": {"alpha": "none"}}, r"head.alpha='none' is not valid; expected auto or a number in "
                                  r"\[0.0, 100.0\]"),
    ({"backbone": {"mean": [0.5, 0.5]}}, r"backbone.mean=\[0.5, 0.5\] has the wrong type; "
                                         r"expected a list of 3 numbers or null"),
    ({"finetune": {"strategy": "some"}}, r"finetune.strategy='some' is not valid; choose one of: "
                                         r"head, last_k, full, scratch"),
    ({"head": {"class_weight": "equal"}}, r"choose one of: null, balanced"),
    ({"backbone": {"engine": "tensorrt"}}, r"^params: backbone.engine='tensorrt' is not valid; "
                                           r"choose one of: auto, onnxruntime, torch$"),
    ({"head": {"max_iter": 10.5}}, r"head.max_iter=10.5 has the wrong type; expected int"),
    ({"finetune": {"enabled": "yes please"}}, r"finetune.enabled='yes please' has the wrong type"),
    ({"seed": True}, r"seed=True has the wrong type"),
    ({"head": [1, 2]}, r"'head' must be a mapping"),
    ({"finetune": {"lr": "nan"}}, r"finetune.lr='nan' is not a finite number; allowed: "
                                  r"auto or a number in \(0.0, 10.0\]"),
    ({"finetune": {"select_by": "f1"}}, r"finetune.select_by='f1' is not valid; choose one of: "
                                        r"accuracy, balanced_accuracy, log_loss"),
    ({"finetune": {"class_weight": "inverse"}}, r"choose one of: null, balanced"),
    ({"finetune": {"sampler": "stratified"}}, r"choose one of: random, balanced"),
    ({"finetune": {"ema_decay": 1.0}}, r"finetune.ema_decay=1.0 is out of range; allowed: "
                                       r"\(0.0, 0.99999\]"),
    ({"finetune": {"ema_decay": float("nan")}}, r"finetune.ema_decay=nan is not a finite number"),
    ({"finetune": {"mixup_alpha": -0.2}}, r"finetune.mixup_alpha=-0.2 is out of range; "
                                          r"allowed: \[0.0, 10.0\]"),
    ({"finetune": {"cutmix_alpha": 11}}, r"finetune.cutmix_alpha=11 is out of range"),
    ({"finetune": {"flip_average": "yes"}}, r"finetune.flip_average='yes' has the wrong type"),
    ({"head": {"C": [1, 2]}}, r"head.C=\[1, 2\] has the wrong type; expected auto or a number "
                              r"in \(0.0, inf\)$"),
    ({"backbone": {"batch_size": 8.5}}, r"backbone.batch_size=8.5 has the wrong type; expected "
                                        r"auto or a whole number in \[1, \d+\]$"),
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


def test_a_whole_number_in_exponent_or_decimal_form_is_read_as_an_integer():
    # `dvc exp run -S head.max_iter=1e3` writes 1e3, which PyYAML reads as a string.
    for written in ("1e3", 1000.0, "1000.0"):
        assert params_from_dict({"head": {"max_iter": written}}).head.max_iter == 1000
    with pytest.raises(ParamsError, match=r"head.max_iter='1.5e0' has the wrong type"):
        params_from_dict({"head": {"max_iter": "1.5e0"}})


def test_exponent_without_dot_is_read_as_a_float():
    # PyYAML reads 1e-4 as a string; `dvc exp run -S finetune.lr=1e-4` writes exactly that.
    assert params_from_dict({"finetune": {"lr": "1e-4"}}).finetune.lr == pytest.approx(1e-4)
    with pytest.raises(ParamsError, match=r"finetune.lr='fast' is not valid; expected "
                                          r"auto or a number in \(0.0, 10.0\]"):
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
    assert params_from_dict({"finetune": {"lr": "auto"}}).finetune.lr == "auto"
    assert params_from_dict({"finetune": {"ema_decay": 0.999}}).finetune.ema_decay == 0.999


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
        "auto, float32, bfloat16, float16"]
    assert list(tmp_path.iterdir()) == [tmp_path / "params.yaml"]


def typed_keys(*types):
    """(dotted name, field) of every parameter whose type admits one of ``types``."""
    import dataclasses
    import typing

    for section, key in every_key():
        owner = type(getattr(Params(), section)) if section else Params
        hint = typing.get_type_hints(owner)[key]
        if set(types) & {hint, *typing.get_args(hint)}:
            field = {f.name: f for f in dataclasses.fields(owner)}[key]
            yield (f"{section}.{key}" if section else key), field


def nested(name: str, value):
    section, _, key = name.rpartition(".")
    return {section: {key: value}} if section else {key: value}


@pytest.mark.parametrize("name", [name for name, _ in typed_keys(float)])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "1e999",
                                   10**400], ids=["nan", "inf", "-inf", "'nan'", "'1e999'",
                                                  "10**400"])
def test_every_float_key_refuses_non_finite_values(name, value):
    with pytest.raises(ParamsError, match=rf"{name}=.* is not a finite number"):
        params_from_dict(nested(name, value))


@pytest.mark.parametrize("name", ["backbone.mean", "backbone.std"])
def test_normalization_lists_refuse_non_finite_values(name):
    with pytest.raises(ParamsError, match=rf"{name}=\[0.5, nan, 0.5\] is not a finite number"):
        params_from_dict(nested(name, [0.5, float("nan"), 0.5]))


def test_a_zero_std_is_refused():
    with pytest.raises(ParamsError, match=r"backbone.std=\[0.5, 0, 0.5\] is out of range; "
                                          r"allowed \(each number\): \(0.0, inf\)"):
        params_from_dict({"backbone": {"std": [0.5, 0, 0.5]}})


def test_nan_in_yaml_names_the_key(tmp_path):
    with pytest.raises(ParamsError, match=r"head.C=nan is not a finite number; "
                                          r"allowed: auto or a number in \(0.0, inf\)"):
        load_params(write(tmp_path, "head:\n  C: .nan\n"))


@pytest.mark.parametrize(("name", "field"), list(typed_keys(int)))
def test_every_integer_key_has_an_upper_bound_and_enforces_it(name, field):
    low, high = field.metadata["range"]
    assert high is not None and high <= 2**63 - 1
    assert params_from_dict(nested(name, high)) is not None  # the bound itself is allowed
    for value in (high + 1, 10**30, low - 1):
        with pytest.raises(ParamsError, match=rf"{name}=.* is out of range; allowed: "):
            params_from_dict(nested(name, value))


def test_a_huge_integer_is_shown_shortened():
    with pytest.raises(ParamsError) as err:
        params_from_dict({"data": {"max_per_class": 10**30}})
    assert str(err.value) == ("params: data.max_per_class=1000000000000000000000000000000 is "
                              "out of range; allowed: [1, 1000000000]")
    with pytest.raises(ParamsError, match=r"seed=1{59}… is out of range"):
        params_from_dict({"seed": int("1" * 80)})


@pytest.mark.parametrize(("content", "found"), [
    ("seed: 1\n".encode("utf-16"), "byte 0xff; the file looks like UTF-16"),
    ("data:\n  source: data/raw/café\n".encode("latin-1"), "byte 0xe9"),
])
def test_a_params_file_that_is_not_utf8_is_named(tmp_path, content, found):
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    with pytest.raises(PipelineError) as err:
        load_params(path)
    assert str(err.value) == (f"{path}: not UTF-8 text ({found}); save it as UTF-8, with or "
                              "without BOM")


def test_a_params_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes("seed: 3\n".encode("utf-8-sig"))
    assert load_params(path).seed == 3


def test_deeply_nested_yaml_is_one_error(tmp_path):
    with pytest.raises(ParamsError, match="invalid YAML"):
        load_params(write(tmp_path, "seed: " + "[" * 5000 + "]" * 5000 + "\n"))


@pytest.mark.parametrize("name", [name for name, _ in typed_keys(str)])
@pytest.mark.parametrize("value", ["data/raw/a\nb", "x\x00y", "\x1b[2J", "a" * 5000],
                         ids=["newline", "nul", "escape", "too long"])
def test_every_text_key_refuses_control_characters_and_overlong_values(name, value):
    with pytest.raises(ParamsError) as err:
        params_from_dict(nested(name, value))
    assert f"{name}=" in str(err.value)
    # A free text key says what text it takes; a key of words (or a word or a number) lists them.
    assert ("is not valid; a name or path of at most 4096 characters, without control "
            "characters") in str(err.value) or "choose one of" in str(err.value) \
        or "is not valid; expected auto or a number in" in str(err.value)


@pytest.mark.parametrize("word", ["yes", "No", "on", "OFF"])
def test_yaml_1_1_booleans_are_text_as_dvc_reads_them_and_refused_for_a_bool(tmp_path, word):
    # `dvc exp run -S finetune.enabled=yes` writes `yes`, which DVC shows and compares as text;
    # PyYAML's YAML 1.1 read it as true, so the stage fine-tuned on a value DVC did not see.
    path = tmp_path / "params.yaml"
    path.write_text(f"finetune:\n  enabled: {word}\n  strategy: full\n")
    with pytest.raises(ParamsError, match=rf"finetune.enabled='{word}' has the wrong type; "
                                          r"expected bool: write true or false"):
        load_params(path)
    path.write_text("finetune:\n  enabled: True\n")
    assert load_params(path).finetune.enabled is True
