"""The like-for-like comparison with a registered model's champion (jobs.compare), on job folders laid out as training
leaves them: a trained champion and an untrained challenger, each with its own data and test split. The figures are
checked against plain transformers scoring the same rows by hand."""

import json
import shutil

import pytest
import torch

from jobdirs import make_job, trained_classifier
from jobs.compare import compare_with_champion
from tiny import keyword_rows


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("models")
    return trained_classifier(d / "good", tokenizer), trained_classifier(d / "untrained", tokenizer, epochs=0)


def accuracy_by_hand(model_dir, job_dir) -> tuple[float, int]:
    """A saved classifier's accuracy on a job folder's tokenized test split, one row at a time, labels by name."""
    import datasets
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    names = json.loads((job_dir / "prepared" / "labels.json").read_text())
    test = datasets.load_from_disk(str(job_dir / "prepared" / "data"))["test"]
    right = 0
    with torch.no_grad():
        for row in test:
            got = model(input_ids=torch.tensor([row["input_ids"]])).logits.argmax(-1).item()
            right += model.config.id2label[got] == names[row["labels"]]
    return right / len(test), len(test)


def champion_file(job, champ, version=1):
    (job / "champion.json").write_text(json.dumps({
        "model": "topics", "version": version, "job_id": champ.name, "model_dir": str(champ / "model"),
        "prepared": str(champ / "prepared")}))
    (job / "eval.json").write_text(json.dumps({"test": {"accuracy": 0.5}}))


def test_both_models_on_both_test_splits_match_scoring_by_hand(tmp_path, models):
    good, untrained = models
    champ, _ = make_job(tmp_path, good, "classification", keyword_rows(200, seed=3), name="champ")
    new, recipe = make_job(tmp_path, untrained, "classification", keyword_rows(240, seed=4), name="new")
    champion_file(new, champ)
    lines = []
    out = compare_with_champion(new, recipe, log=lines.append)
    here, there = out["on_this_test"], out["on_champion_test"]
    assert (out["model"], out["version"], out["job_id"]) == ("topics", 1, "champ")
    want, n = accuracy_by_hand(good, new)
    assert here["rows"] == n == 24 and here["champion"]["accuracy"] == pytest.approx(want)
    assert here["challenger"]["accuracy"] == pytest.approx(accuracy_by_hand(untrained, new)[0])
    want, n = accuracy_by_hand(untrained, champ)
    assert there["rows"] == n == 20 and there["challenger"]["accuracy"] == pytest.approx(want)
    assert here["champion"]["accuracy"] >= 0.9 > here["challenger"]["accuracy"]  # trained against untrained
    saved = json.loads((new / "eval.json").read_text())
    assert saved["champion"] == json.loads(json.dumps(out)) and saved["test"] == {"accuracy": 0.5}
    assert lines[0].startswith("this job's test split (24 rows): accuracy ") and "for champion topics v1" in lines[0]


def test_labels_in_another_order_are_matched_by_name(tmp_path, models, tokenizer):
    """A champion whose head lists the labels the other way round scores the same as by hand, label by name."""
    good, _ = models
    flipped = trained_classifier(tmp_path / "flipped", tokenizer, labels=("pos", "neg"))
    champ, _ = make_job(tmp_path, good, "classification", keyword_rows(200, seed=3), name="champ")
    new, recipe = make_job(tmp_path, flipped, "classification", keyword_rows(200, seed=5), name="new")
    (new / "model" / "labels.json").write_text(json.dumps(["pos", "neg"]))  # its own order, as its config says
    champion_file(new, champ)
    out = compare_with_champion(new, recipe, log=lambda m: None)
    assert out["on_this_test"]["challenger"]["accuracy"] == pytest.approx(accuracy_by_hand(flipped, new)[0])
    assert out["on_this_test"]["challenger"]["accuracy"] < 0.2, "trained on flipped names: wrong by name"


def test_what_cannot_be_compared_is_said_and_the_job_goes_on(tmp_path, models):
    good, untrained = models
    champ, _ = make_job(tmp_path, good, "classification", keyword_rows(200, seed=3), name="champ")
    new, recipe = make_job(tmp_path, untrained, "classification", keyword_rows(200, seed=4), name="new")
    assert compare_with_champion(new, recipe) is None, "no champion.json: nothing to compare"

    champion_file(new, champ)
    shutil.rmtree(champ / "prepared")  # the champion's own test split is gone: its half only
    out = compare_with_champion(new, recipe, log=lambda m: None)
    assert out["on_this_test"]["rows"] == 20 and out["on_champion_test"] is None
    assert "prepared/data is gone" in out["champion_test_missing"]

    shutil.rmtree(champ / "model")
    out = compare_with_champion(new, recipe, log=lambda m: None)
    assert out == {"model": "topics", "version": 1, "job_id": "champ",
                   "note": f"{champ / 'model'} holds no model (its job folder was removed or never finished)"}

    (new / "champion.json").write_text('{"model": "topics", "version": "1; DROP TABLE"}')
    out = compare_with_champion(new, recipe, log=lambda m: None)
    assert out["note"].startswith("champion.json is not what the server writes")
    (new / "champion.json").write_text("\0\0\0")
    assert compare_with_champion(new, recipe, log=lambda m: None)["note"] == \
        "champion.json cannot be read (JSONDecodeError)"
