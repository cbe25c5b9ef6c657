"""Bad configuration fails at start, with a message that names the key or file."""
from pathlib import Path

import pytest

from distill.config.schema import ConfigError, load_config
from tests.conftest import tiny_config_yaml


@pytest.fixture
def config_path(tiny, tmp_path):
    return tiny_config_yaml(tiny, tmp_path / "run")


def _fails(config_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config_path, overrides)


def test_valid_config_loads_typed_and_read_only(config_path):
    cfg = load_config(config_path)
    assert cfg.teachers.models[1].temperature == 1.5
    assert cfg.training.micro_batch_size == 8
    with pytest.raises(Exception):
        cfg.training.micro_batch_size = 3


def test_list_index_override(config_path, tiny):
    cfg = load_config(config_path, ["teachers.models.1.weight=0.25", "loss.kd_alpha=0.9"])
    assert cfg.teachers.models[1].weight == 0.25 and cfg.loss.kd_alpha == 0.9


@pytest.mark.parametrize("overrides, message", [
    (["training.micro_batchsize=4"], r"unknown config key 'training.micro_batchsize'"),
    (["student.from_teacher=null", "student.path=some/model"], r"student.layers picks the layers copied from a teacher "
     r"and is read only with student.from_teacher"),
    (["lossy.kd_alpha=0.5"], r"unknown config key 'lossy"),
    (["teachers.models.0.wieght=1"], r"unknown config key 'teachers.models\[0\].wieght'"),
    (["training.micro_batch_size=many"], r"training.micro_batch_size"),
    (["teachers.models.0.weight=-0.5"], r"teachers.models\[0\].weight must be >= 0"),
    (["teachers.models.0.weight=0", "teachers.models.1.weight=0"], r"weight are all zero"),
    (["teachers.models.1.temperature=0"], r"teachers.models\[1\].temperature=0 is outside \[0.05, 100\]"),
    (["loss.temperature=-1"], r"loss.temperature=-1 is outside \[0.05, 100\]"),
    (["loss.temperature=1e-30"], r"loss.temperature=1e-30 is outside \[0.05, 100\]: below it every distribution is one-hot"),
    (["loss.temperature=500"], r"loss.temperature=500 is outside"),
    (["teachers.models.5.weight=1"], r"teachers.models has 2 entries, so index 5 does not exist: use an index below 2"),
    (["data.text_fields=text"], r"config key 'data.text_fields' takes a list: write data.text_fields=\[VALUE\]"),
    (["loss.kd_alpha=1.5"], r"loss.kd_alpha must lie in \[0, 1\]"),
    (["loss.label_smoothing=1.0"], r"loss.label_smoothing must lie in \[0, 1\)"),
    (["loss.divergence=wasserstein"], r"loss.divergence: 'wasserstein' is not one of \['forward_kl', 'jsd'"),
    (["loss.jsd_beta=1.0"], r"loss.jsd_beta must lie in \(0, 1\)"),
    (["loss.skew=-0.1"], r"loss.skew must lie in \[0, 1\)"),
    (["student.path=/nonexistent/model"], r"set exactly one of student.path"),
    (["teachers.models.0.path=/nonexistent/teacher"], r"teachers.models\[0\].path: model directory /nonexistent/teacher does not exist"),
    (["data.train.path=/nonexistent/train.csv"], r"data.train.path: data file /nonexistent/train.csv does not exist"),
    (["interpolation.method=harmonic"], r"interpolation.method: 'harmonic' is not one of"),
    (["teachers.placement=everywhere"], r"teachers.placement"),
    (["deepspeed.zero_stage=4"], r"deepspeed.zero_stage must be 0, 1, 2 or 3"),
    (["student.from_teacher=c"], r"student.from_teacher: 'c' is neither a teacher name"),
    (["data.text_fields=[a,b,c]"], r"data.text_fields takes one field or a pair"),
    (["teachers.models.1.name=a"], r"names must be unique"),
    (["teachers.models.0.name=target"], r"reserved"),
    (["teachers.models.0.name=../../etc"], r"teachers.models\[0\].name: '../../etc' is not a safe name"),
    (["data.eval_domains=[{name: a/b, match: x}]"], r"data.eval_domains\[0\].name: 'a/b' is not a safe name"),
    (["training.resume=sometimes"], r"training.resume"),
    (["teachers.compile=true", "teachers.placement=zero3"], r"teachers.compile with teachers.placement=zero3"),
    (["teachers.compile=true", "teachers.cache=/tmp"], r"teachers.compile with teachers.cache: no teacher runs"),
    (["teachers.compile=true", "loss.intermediate=[{teacher: a}]"], r"teachers.compile with loss.intermediate"),
    (["nokey"], r"must look like dotted.key=value"),
])
def test_bad_values_are_named(config_path, overrides, message):
    _fails(config_path, overrides, message)


def test_kd_without_teachers_is_refused(config_path):
    _fails(config_path, ["teachers.models=[]", "student.from_teacher=null", "student.path=" + str(Path(config_path).parent)],
           r"teachers.models is empty but loss.kd_alpha > 0")


def test_missing_required_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\n")
    _fails(path, [], r"'output_dir'.*required")


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("teachers: [unclosed\n")
    _fails(path, [], r"broken.yaml is not valid YAML")


def test_missing_config_file(tmp_path):
    _fails(tmp_path / "absent.yaml", [], r"absent.yaml does not exist")


def test_empty_data_file_is_named(config_path, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    _fails(config_path, [f"data.train.path={empty}"], r"data.train.path: data file .*empty.csv is empty")


def test_pickled_only_weights_are_refused_unless_allowed(tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification

    import torch

    pickled = tmp_path / "pickled"
    model = AutoModelForSequenceClassification.from_pretrained(tiny["teacher_a"])
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # an old-style pickled checkpoint
    assert (pickled / "pytorch_model.bin").is_file() and not list(pickled.glob("*.safetensors"))
    config = tiny_config_yaml(tiny, tmp_path / "run")
    _fails(config, [f"teachers.models.0.path={pickled}"],
           r"teachers.models\[0\].path: .*pickled holds only pickled weights \['pytorch_model.bin'\]")
    cfg = load_config(config, [f"teachers.models.0.path={pickled}", "allow_pickled_weights=true"])
    assert cfg.allow_pickled_weights and cfg.trust_remote_code is False


def test_include_merges_the_base_first_and_refuses_cycles(config_path, tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"include: {config_path}\nloss: {{kd_alpha: 0.9}}\n")
    cfg = load_config(child)
    assert cfg.loss.kd_alpha == 0.9 and cfg.training.micro_batch_size == 8  # the rest from the base
    loop = tmp_path / "loop.yaml"
    loop.write_text("include: loop.yaml\n")
    _fails(loop, [], r"includes itself")
    dangling = tmp_path / "dangling.yaml"
    dangling.write_text("include: nowhere.yaml\n")
    _fails(dangling, [], r"nowhere.yaml does not exist \(included from .*dangling.yaml\)")


def test_repository_configs_are_valid():
    from tests.helpers import ROOT

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        text = path.read_text()
        if any(prepared in text for prepared in ("runs/demo/", "runs/demo_lm/", "runs/demo_lm_cross/", "runs/ner/",
                                                 "include:")):
            # these name files launch/demo.sh prepares (teachers, the converted encoder):
            # check the schema and values without the file checks
            from omegaconf import OmegaConf
            from distill.config.schema import DistillConfig, _read_with_includes

            from distill.tasks import check_task_config

            cfg = OmegaConf.merge(OmegaConf.structured(DistillConfig), *_read_with_includes(path, []))
            check_task_config(cfg)
        else:
            from distill.tasks import load_task_config

            load_task_config(path)


def _task_refuses(config_path, overrides, message):
    from distill.tasks import load_task_config

    with pytest.raises(ConfigError, match=message):
        load_task_config(config_path, overrides)


@pytest.mark.parametrize("overrides, message", [
    (["data.block_size=64"], r"task sequence_classification does not read \['data.block_size'\]"),
    (["loss.chunk_tokens=256", "loss.fused=false"],
     r"does not read \['loss.chunk_tokens', 'loss.fused'\] \(settings of task causal_lm\)"),
    (["data.prompt_field=p", "data.response_field=r"], r"does not read \['data.prompt_field', 'data.response_field'\]"),
    (["task=causal_lm"], r"task causal_lm does not read \['data.unlabeled.path', 'data.label_names', 'data.label_field'\]"),
    (["task=translation"], r"task: 'translation' is not one of \['causal_lm', 'sequence_classification', 'token_classification'\]"),
])
def test_settings_the_chosen_task_ignores_are_refused(config_path, overrides, message):
    _task_refuses(config_path, overrides, message)


@pytest.mark.parametrize("key", ["teachers.micro_batch_size=8", "student.num_labels=3"])
def test_keys_nothing_reads_are_gone_from_the_schema(config_path, key):
    _fails(config_path, [key], r"unknown config key")


def test_optional_sections_given_in_a_file_load(config_path, tmp_path):
    """Sections that are None in the schema (schedules.*) given as mappings in a YAML file."""
    child = tmp_path / "scheduled.yaml"
    child.write_text(f"include: {config_path}\nschedules:\n  kd_alpha: {{kind: linear, start: 0.1, end: 0.9}}\n"
                     "  teacher_weights: {kind: cosine, start: [1.0, 0.0], end: [0.5, 0.5]}\n")
    cfg = load_config(child)
    assert cfg.schedules.kd_alpha.end == 0.9 and list(cfg.schedules.teacher_weights.start) == [1.0, 0.0]
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"include: {config_path}\nschedules:\n  kd_alpha: [0.1, 0.9]\n")
    _fails(bad, [], r"schedules.kd_alpha must be a mapping")


def test_a_task_declares_the_settings_it_owns_and_the_others_refuse_them(tiny, tmp_path):
    """issue 28: no task lists another's keys; a new task that owns a key makes every other task
    refuse it, with no edit to them (a throwaway task registered for the test)."""
    from distill.tasks import TASKS, check_task_config, set_keys
    from distill.tasks.base import Task

    from omegaconf import OmegaConf

    from distill.config.schema import DistillConfig

    cfg = OmegaConf.merge(OmegaConf.structured(DistillConfig), {
        "output_dir": "x", "teachers": {"models": [{"path": "a"}, {"path": "b", "logits": "b.csv"}]}})
    assert set_keys(cfg, "teachers.models[*].logits") == ["teachers.models[1].logits"]
    assert set_keys(cfg, "data.block_size") == []

    class Throwaway(Task):
        owns = ("data.block_size", "data.label_names", "data.label_field", "data.unlabeled.path")

    TASKS["throwaway"] = Throwaway
    try:
        config = tiny_config_yaml(tiny, tmp_path / "run")
        _task_refuses(config, ["data.block_size=64"],
                      r"task sequence_classification does not read \['data.block_size'\] \(settings of task "
                      r"causal_lm, throwaway\)")
        accepted = load_config(config, ["task=throwaway", "data.block_size=64"])
        check_task_config(accepted)  # it owns data.block_size and the label settings the tiny config sets
        with pytest.raises(ConfigError, match=r"task throwaway does not read \['student.trim_vocab'\]"):
            check_task_config(load_config(config, ["task=throwaway", "student.trim_vocab=true"]))
    finally:
        del TASKS["throwaway"]
