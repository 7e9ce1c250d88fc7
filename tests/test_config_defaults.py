"""A partial config section is applied on top of that section's own defaults (never the nested class's)."""

from __future__ import annotations

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from fat_distill.cli import app
from fat_distill.config_sections import Section, merge_onto
from fat_distill.pipeline import PipelineConfig, load_config
from fat_distill.train import TrainConfig


def _defaulted_sections(model: type[BaseModel], prefix: str = ""):
    """(dotted name, factory default) of every sub-section built by a default_factory, recursively."""
    for name, field in model.model_fields.items():
        if field.default_factory is None:
            continue
        default = field.default_factory()
        if isinstance(default, BaseModel):
            yield f"{prefix}{name}", default
            yield from _defaulted_sections(type(default), f"{prefix}{name}.")


SECTIONS = list(_defaulted_sections(PipelineConfig))


def _get(config: BaseModel, dotted: str) -> BaseModel:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def _one_field_changed(section: BaseModel) -> tuple[str, object]:
    """A field of ``section`` and a valid value different from its default (a bool flipped or an int bumped)."""
    for name, value in section.model_dump().items():
        if isinstance(value, bool):
            return name, not value
        if isinstance(value, int) and name in ("seed", "split_seed"):
            return name, value + 7
    for name, value in section.model_dump().items():
        if isinstance(value, int) and not isinstance(value, bool):
            return name, value + 1
    raise AssertionError(f"no simple field to change in {type(section).__name__}")


def test_every_defaulted_section_is_covered():
    names = [name for name, _ in SECTIONS]
    assert {"run", "data", "data.synth", "noise", "teacher", "teacher.train", "student", "student.train"} <= set(names)


@pytest.mark.parametrize("dotted,default", SECTIONS, ids=[name for name, _ in SECTIONS])
def test_partial_section_in_yaml_keeps_the_sections_defaults(tmp_path, dotted, default):
    field, value = _one_field_changed(default)
    nested: dict = {field: value}
    for part in reversed(dotted.split(".")):
        nested = {part: nested}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(nested))

    config = load_config(PipelineConfig, path)
    expected = default.model_dump() | {field: value}
    assert _get(config, dotted).model_dump() == expected


@pytest.mark.parametrize("dotted,default", SECTIONS, ids=[name for name, _ in SECTIONS])
def test_set_override_of_one_field_keeps_the_sections_defaults(dotted, default):
    field, value = _one_field_changed(default)
    config = load_config(PipelineConfig, None, [f"{dotted}.{field}={str(value).lower()}"])
    assert _get(config, dotted).model_dump() == default.model_dump() | {field: value}


def test_teacher_keeps_its_regime_epochs_per_round_when_one_training_field_is_set(tmp_path):
    (tmp_path / "c.yaml").write_text("teacher: {train: {seed: 0, lr: 0.001}}\n")
    config = load_config(PipelineConfig, tmp_path / "c.yaml")
    assert config.teacher.train.epochs is None and config.teacher.train.resolved("teacher").epochs == 20
    assert config.teacher.train.resolved("teacher").lr == 0.001
    # the student's section has the class defaults, untouched by the teacher's
    assert config.student.train.epochs == PipelineConfig().student.train.epochs


def test_unset_lr_epochs_warmup_follow_the_regime_and_an_explicit_value_wins(tmp_path):
    scratch = load_config(PipelineConfig, None)
    pretrained = load_config(PipelineConfig, None, ["teacher.train.weights=w.pt", "student.train.weights=w.pt"])
    assert (scratch.teacher.train.regime, pretrained.teacher.train.regime) == ("scratch", "pretrained")
    assert [(t.lr, t.epochs) for t in (scratch.teacher.train.resolved("teacher"),
                                       scratch.student.train.resolved("student"))] == [(3e-3, 20), (3e-3, 35)]
    assert [(t.lr, t.epochs) for t in (pretrained.teacher.train.resolved("teacher"),
                                       pretrained.student.train.resolved("student"))] == [(3.5e-4, 5), (3.5e-4, 10)]
    explicit = load_config(PipelineConfig, None, ["student.train.weights=w.pt", "student.train.lr=0.01"])
    assert explicit.student.train.resolved().lr == 0.01
    # the stage hashes name the resolved values: a regime change retrains, an equal explicit value does not
    assert scratch.student.training_hash() != pretrained.student.training_hash()
    same = load_config(PipelineConfig, None, ["student.train.lr=0.003", "student.train.epochs=35"])
    assert same.student.training_hash() == scratch.student.training_hash()
    # the crop padding scales with the image: 10 px at 128 px, 2 px at 32 px
    assert [TrainConfig(image_size=s).resolved().pad for s in ((128, 64), (32, 32), (56, 46))] == [10, 2, 4]


def test_config_show_prints_each_unset_value_and_its_regime():
    runner = CliRunner()
    scratch = runner.invoke(app, ["config", "show"]).stdout
    assert "lr: null  # 0.003: scratch regime (weights: null) default" in scratch
    assert "epochs: null  # 20 a round: scratch regime (weights: null) default" in scratch
    pretrained = runner.invoke(app, ["config", "show", "--set", "student.train.weights=w.pt"]).stdout
    assert "lr: null  # 0.00035: pretrained regime (weights set) default" in pretrained
    assert yaml.safe_load(pretrained)["student"]["train"]["lr"] is None  # still a config that follows the regime


def test_config_show_prints_the_teachers_defaults_under_a_partial_section(tmp_path):
    (tmp_path / "c.yaml").write_text("teacher: {train: {seed: 0}}\n")
    runner = CliRunner()
    shown = [yaml.safe_load(runner.invoke(app, args).stdout)
             for args in (["config", "show"], ["config", "show", str(tmp_path / "c.yaml")],
                          ["config", "show", "--set", "teacher.train.seed=0"])]
    assert [s["teacher"]["train"]["epochs"] for s in shown] == [None, None, None]  # a round's, by regime
    assert [s["teacher"]["train"]["seed"] for s in shown] == [0, 0, 0]


def test_an_explicit_value_still_wins_over_the_sections_default(tmp_path):
    (tmp_path / "c.yaml").write_text("teacher: {train: {epochs: 9}}\n")
    assert load_config(PipelineConfig, tmp_path / "c.yaml").teacher.train.epochs == 9


def test_unknown_key_inside_a_partial_section_is_still_an_error(tmp_path):
    from fat_distill.pipeline.overrides import ConfigError

    (tmp_path / "c.yaml").write_text("teacher: {train: {epoch: 9}}\n")
    with pytest.raises(ConfigError, match="teacher.train.epoch: unknown key"):
        load_config(PipelineConfig, tmp_path / "c.yaml")


def test_merge_onto_merges_mappings_and_replaces_everything_else():
    assert merge_onto({"a": {"x": 1, "y": 2}, "b": [1, 2]}, {"a": {"y": 3}, "b": [5]}) == {"a": {"x": 1, "y": 3},
                                                                                      "b": [5]}


def test_section_with_a_custom_factory_keeps_it():
    from pydantic import Field

    class Inner(Section):
        a: int = 1
        b: int = 2

    class Outer(Section):
        inner: Inner = Field(default_factory=lambda: Inner(a=10))

    assert Outer.model_validate({"inner": {"b": 3}}).inner == Inner(a=10, b=3)
    assert Outer.model_validate({}).inner == Inner(a=10, b=2)
