"""Sentence-embedding classifiers (distill/models/pooled_classifier.py): a linear head on mean/CLS-pooled,
optionally normalised encoder states, built from an encoder plus a head in safetensors, used as a
teacher and as a student, exported with its code so plain transformers loads it elsewhere."""
import json
import subprocess
import sys

import pytest
import torch

from distill.config.schema import ConfigError, load_config
from tests.conftest import tiny_config_yaml, tiny_lm_config_yaml
from tests.helpers import run_cli, run_cli_in_process

HEAD_LABELS = ["positive", "negative", "neutral"]  # another order than the data's: matched by name


@pytest.fixture(scope="module")
def encoder_and_head(tiny, tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("pooled")
    encoder = AutoModel.from_pretrained(tiny["teacher_a"], add_pooling_layer=False)
    encoder.save_pretrained(root / "encoder")
    tiny["tokenizer"].save_pretrained(root / "encoder")
    torch.manual_seed(0)
    head = {"weight": torch.randn(3, encoder.config.hidden_size) * 2, "bias": torch.randn(3)}
    save_file(head, str(root / "head.safetensors"), metadata={"labels": json.dumps(HEAD_LABELS)})
    return root / "encoder", root / "head.safetensors", head


def test_a_pooled_teacher_computes_the_normalised_mean_pool_times_its_head(tiny, encoder_and_head):
    from transformers import AutoModel

    from distill.models.loading import load_pooled_classifier

    encoder_dir, head_file, head = encoder_and_head
    model = load_pooled_classifier(str(encoder_dir), "teachers.models[0]", False, torch.float32, "mean", True,
                                   str(head_file)).eval()
    encoded = tiny["tokenizer"](["great ride on the road", "awful"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoded).logits
        hidden = AutoModel.from_pretrained(encoder_dir).double()(**encoded).last_hidden_state
    mask = encoded["attention_mask"].double().unsqueeze(-1)
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # the padded positions of row 2 do not count
    pooled = pooled / pooled.norm(dim=-1, keepdim=True)
    expected = pooled @ head["weight"].double().T + head["bias"].double()
    torch.testing.assert_close(logits.double(), expected, atol=1e-5, rtol=1e-5)
    assert [model.config.id2label[i] for i in range(3)] == HEAD_LABELS
    cls = load_pooled_classifier(str(encoder_dir), "t", False, torch.float32, "cls", False, str(head_file)).eval()
    with torch.no_grad():
        torch.testing.assert_close(cls(**encoded).logits.double(),
                                   hidden[:, 0] @ head["weight"].double().T + head["bias"].double(), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_pooled_teacher_and_student_train_and_export_with_their_code(tiny, encoder_and_head, tmp_path):
    encoder_dir, head_file, _ = encoder_and_head
    run_dir = tmp_path / "run"
    config = tiny_config_yaml(tiny, run_dir)
    teachers = (f"teachers.models=[{{name: pooled, path: {encoder_dir}, pooling: mean, normalize: true, "
                f"head: {head_file}}}, {{name: b, path: {tiny['teacher_b']}}}]")
    done = run_cli(["train", config, teachers, "student.from_teacher=pooled", "student.layers=[0, 2]",
                    "student.pooling=mean", "student.normalize=true", "training.max_steps=4"])
    assert done.returncode == 0, done.stderr[-4000:]
    exported = run_dir / "student"
    assert (exported / "pooled_classifier.py").is_file()
    built = json.loads((exported / "config.json").read_text())
    assert built["model_type"] == "distill_pooled_classifier" and built["pooling"] == "mean" and built["normalize"]
    assert built["num_hidden_layers"] == 2 == built["encoder"]["num_hidden_layers"]
    assert [built["id2label"][str(i)] for i in range(3)] == ["negative", "neutral", "positive"]  # the data's order
    # plain transformers in a process that never imports distill: the folder's own code runs
    script = f"""
import sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained({str(exported)!r}, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained({str(exported)!r}, trust_remote_code=True)
with torch.no_grad():
    print(model(**tokenizer(["great ride"], return_tensors="pt")).logits.tolist())
assert "distill" not in sys.modules
"""
    outside = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                             env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert outside.returncode == 0, outside.stderr[-3000:]
    assert "trust_remote_code=True" in (exported / "README.md").read_text()
    from distill.models.loading import load_sequence_classifier

    inside = load_sequence_classifier(str(exported), "student", False).eval()
    with torch.no_grad():
        expected = inside(**tiny["tokenizer"](["great ride"], return_tensors="pt")).logits
    got = torch.tensor(json.loads(outside.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_pooling_settings_are_checked(tiny, tiny_lm, tmp_path):
    config = tiny_config_yaml(tiny, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"student: \['normalize'\] apply to pooled states"):
        load_config(config, ["student.normalize=true"])
    with pytest.raises(ConfigError, match="pooling='max': use cls or mean"):
        load_config(config, ["teachers.models.0.pooling=max"])
    with pytest.raises(ConfigError, match="is not a .safetensors file"):
        load_config(config, ["teachers.models.0.pooling=mean", f"teachers.models.0.head={tmp_path / 'missing.bin'}"])
    lm = run_cli_in_process(["train", tiny_lm_config_yaml(tiny_lm, tmp_path / "lm"), "student.pooling=mean"])
    assert lm.returncode == 2 and "task causal_lm does not read ['student.pooling']" in lm.stderr


BAG_CODE = '''
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class BagConfig(PretrainedConfig):
    model_type = "bag_of_embeddings_test"

    def __init__(self, vocab_size=300, hidden_size=16, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.hidden_size = vocab_size, hidden_size


class BagClassifier(PreTrainedModel):
    config_class = BagConfig
    base_model_prefix = "bag"

    def __init__(self, config):
        super().__init__(config)
        self.bag = nn.Embedding(config.vocab_size, config.hidden_size)
        self.scorer = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module):
        pass

    def get_input_embeddings(self):
        return self.bag

    def set_input_embeddings(self, value):
        self.bag = value

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        mask = attention_mask.unsqueeze(-1).to(self.bag.weight.dtype)
        pooled = (self.bag(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return SequenceClassifierOutput(logits=self.scorer(pooled))
'''


def _custom_model_folder(tiny, folder):
    """A classifier whose architecture transformers does not know: its code lives in the folder."""
    import importlib.util

    folder.mkdir(parents=True)
    source = folder.parent / "bag_source" / "bag_classifier.py"
    source.parent.mkdir()
    source.write_text(BAG_CODE)
    spec = importlib.util.spec_from_file_location("bag_classifier", source)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bag_classifier"] = module  # save_pretrained copies the file it finds there
    spec.loader.exec_module(module)
    module.BagConfig.register_for_auto_class()
    module.BagClassifier.register_for_auto_class("AutoModelForSequenceClassification")
    torch.manual_seed(1)
    labels = ["negative", "neutral", "positive"]
    config = module.BagConfig(vocab_size=len(tiny["tokenizer"]), hidden_size=16, num_labels=3,
                              id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    module.BagClassifier(config).save_pretrained(folder)
    tiny["tokenizer"].save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_a_model_with_its_own_code_trains_evaluates_and_exports_when_the_config_allows_it(tiny, tmp_path):
    custom = _custom_model_folder(tiny, tmp_path / "bag")
    assert json.loads((custom / "config.json").read_text())["auto_map"]
    run_dir = tmp_path / "run"
    config = tiny_config_yaml(tiny, run_dir)
    options = [f"teachers.models=[{{name: bag, path: {custom}}}, {{name: b, path: {tiny['teacher_b']}}}]",
               "student.from_teacher=null", "student.layers=null", f"student.path={custom}", "training.max_steps=4"]
    refused = run_cli(["train", config, *options])
    assert refused.returncode == 2 and "trust_remote_code" in refused.stderr and not run_dir.exists()
    done = run_cli(["train", config, *options, "trust_remote_code=true"])
    assert done.returncode == 0, done.stderr[-4000:]
    exported = run_dir / "student"
    assert (exported / "bag_classifier.py").is_file()
    evaluated = run_cli(["eval", exported, config, *options, "trust_remote_code=true"])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    script = f"""
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained({str(exported)!r}, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained({str(exported)!r}, trust_remote_code=True)
print(type(model).__name__)
"""
    outside = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                             env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert outside.returncode == 0 and outside.stdout.strip().splitlines()[-1] == "BagClassifier", outside.stderr[-3000:]
    assert 0 <= report["student"]["accuracy"] <= 1


def test_a_pooled_head_that_is_not_safetensors_is_refused_at_load(tiny, tmp_path):
    """issue 30: pickle bytes in a head named .safetensors gave a SafetensorError traceback."""
    import pickle

    from tests.conftest import tiny_config_yaml
    from tests.helpers import assert_refused_before_writing

    head = tmp_path / "head.safetensors"
    head.write_bytes(pickle.dumps({"weight": [[0.1, 0.2]]}))
    run_dir = tmp_path / "run"
    assert_refused_before_writing(tiny_config_yaml(tiny, run_dir), run_dir,
                                  ["teachers.models.1.pooling=mean", f"teachers.models.1.head={head}"],
                                  f"teachers.models[1].head: {head} is not a readable safetensors file")
