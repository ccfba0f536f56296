"""Job specs: YAML validated by pydantic, canonical hash, path and base-model resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.errors import InvalidJobSpec
from finetune.spec import JobSpec, load_spec, parse_spec, resolve_base_model

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "finetune" / "jobs" / "veltmar-fact.yaml"

MINIMAL = """
name: demo
dataset: {path: data.jsonl}
"""


def test_shipped_example_is_valid_and_points_at_real_data():
    spec = load_spec(EXAMPLE)
    assert spec.name == "veltmar-fact"
    assert spec.dataset.path.is_absolute() and spec.dataset.path.is_file()
    assert spec.lora.r == 8 and "q_proj" in spec.lora.target_modules
    assert spec.evals


def test_defaults_fill_in():
    spec = parse_spec(MINIMAL)
    assert spec.base_model == "smollm2"
    assert spec.training.epochs == 3 and spec.training.max_steps is None
    assert spec.model_name == "demo"


def test_hash_is_canonical_and_sensitive():
    a = parse_spec(MINIMAL)
    b = parse_spec("dataset: {path: data.jsonl}\nname: demo\n")  # other key order, same spec
    assert a.spec_hash() == b.spec_hash() and len(a.spec_hash()) == 64
    c = parse_spec(MINIMAL + "training: {learning_rate: 0.001}\n")
    assert c.spec_hash() != a.spec_hash()
    # A round trip through YAML keeps the hash (the job store keeps spec.to_yaml()).
    assert parse_spec(a.to_yaml()).spec_hash() == a.spec_hash()


def test_relative_dataset_paths_resolve_against_the_spec_folder(tmp_path):
    text = "name: demo\ndataset: {path: d/train.jsonl, validation_path: d/val.jsonl}\n"
    (tmp_path / "spec.yaml").write_text(text)
    spec = load_spec(tmp_path / "spec.yaml")
    assert spec.dataset.path == (tmp_path / "d" / "train.jsonl").resolve()
    assert spec.dataset.validation_path == (tmp_path / "d" / "val.jsonl").resolve()


@pytest.mark.parametrize(("text", "where"), [
    ("name: Demo!\ndataset: {path: x.jsonl}", "name"),
    ("name: demo", "dataset"),
    ("name: demo\ndataset: {path: x.jsonl}\nbogus: 1", "bogus"),
    ("name: demo\ndataset: {path: x.jsonl}\nlora: {r: 0}", "lora.r"),
    ("name: demo\ndataset: {path: x.jsonl}\nlora: {rank: 8}", "lora.rank"),
    ("name: demo\ndataset: {path: x.jsonl}\nlora: {target_modules: []}", "lora.target_modules"),
    ("name: demo\ndataset: {path: x.jsonl, validation_split: 1.5}", "dataset.validation_split"),
    ("name: demo\ndataset: {path: x.jsonl}\ntraining: {epochs: null}", "training"),
    ("name: demo\ndataset: {path: x.jsonl}\ntraining: {learning_rate: -1}", "training.learning_rate"),
    ("name: demo\ndataset: {path: x.jsonl}\ntraining: {batch_size: 0}", "training.batch_size"),
    ("name: demo\ndataset: {path: x.jsonl}\ntraining: {dtype: int8}", "training.dtype"),
])
def test_invalid_specs_name_the_field(text, where):
    with pytest.raises(InvalidJobSpec) as exc:
        parse_spec(text)
    assert exc.value.code == "invalid_job_spec" and exc.value.status == 400
    assert any(e["loc"].startswith(where) for e in exc.value.errors), exc.value.errors


def test_not_yaml_or_not_a_mapping():
    with pytest.raises(InvalidJobSpec, match="not valid YAML"):
        parse_spec("name: [unclosed")
    with pytest.raises(InvalidJobSpec, match="mapping"):
        parse_spec("- a\n- b\n")
    with pytest.raises(InvalidJobSpec, match="cannot read"):
        load_spec("/nonexistent/spec.yaml")


def test_max_steps_alone_is_enough():
    spec = parse_spec("name: demo\ndataset: {path: x.jsonl}\ntraining: {epochs: null, max_steps: 5}")
    assert spec.training.max_steps == 5


def test_base_model_resolution(tmp_path):
    models = tmp_path / "models"
    (models / "tiny").mkdir(parents=True)
    (models / "tiny" / "config.json").write_text("{}")
    spec = JobSpec(name="a", base_model="tiny", dataset={"path": "x"})
    assert resolve_base_model(spec, models) == (models / "tiny").resolve()
    spec = JobSpec(name="a", base_model=str(models / "tiny"), dataset={"path": "x"})
    assert resolve_base_model(spec, tmp_path / "elsewhere") == (models / "tiny").resolve()
    with pytest.raises(InvalidJobSpec, match="not a model folder"):
        resolve_base_model(JobSpec(name="a", base_model="missing", dataset={"path": "x"}), models)
