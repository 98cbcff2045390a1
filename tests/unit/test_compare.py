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


def by_hand(model_dir, job_dir, other_job) -> tuple[float, int, int]:
    """A saved classifier's accuracy on a job folder's tokenized test split, one row at a time, labels by name,
    over the rows whose tokens the other job did not train on: (accuracy, rows scored, rows left out)."""
    import datasets
    from transformers import AutoModelForSequenceClassification

    def rows(job, splits):
        names = json.loads((job / "prepared" / "labels.json").read_text())
        data = datasets.load_from_disk(str(job / "prepared" / "data"))
        return [(r["input_ids"], names[r["labels"]]) for s in splits for r in data[s]]

    trained_on = {tuple(ids) for ids, _ in rows(other_job, ("train", "validation"))}  # by input, whatever label
    test = rows(job_dir, ("test",))
    kept = [(ids, name) for ids, name in test if tuple(ids) not in trained_on]
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        right = sum(model.config.id2label[model(input_ids=torch.tensor([ids])).logits.argmax(-1).item()] == name
                    for ids, name in kept)
    return right / len(kept), len(kept), len(test) - len(kept)


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
    assert (out["model"], out["version"], out["job_id"], out["metric"]) == ("topics", 1, "champ", "accuracy")
    want, n, left = by_hand(good, new, champ)
    assert (here["rows"], here["left_out"]) == (n, left) and here["champion"]["accuracy"] == pytest.approx(want)
    assert here["challenger"]["accuracy"] == pytest.approx(by_hand(untrained, new, champ)[0])
    want, n, left = by_hand(untrained, champ, new)
    assert (there["rows"], there["left_out"]) == (n, left) and there["challenger"]["accuracy"] == pytest.approx(want)
    assert here["champion"]["accuracy"] >= 0.9 > here["challenger"]["accuracy"]  # trained against untrained
    saved = json.loads((new / "eval.json").read_text())
    assert saved["champion"] == json.loads(json.dumps(out)) and saved["test"] == {"accuracy": 0.5}
    assert lines[0] == "scoring champion topics v1 and this model on both test splits"
    assert lines[1].startswith(f"this job's test split ({here['rows']} rows, {here['left_out']} left out that the "
                               "other model trained on): accuracy ") and "for champion topics v1" in lines[1]


def test_a_test_row_the_champion_trained_on_is_left_out(tmp_path, models):
    """The challenger's data repeats rows the champion trained on: those are not counted on its test split."""
    import datasets

    good, untrained = models
    rows = keyword_rows(200, seed=3)
    champ, _ = make_job(tmp_path, good, "classification", rows, name="champ")
    # the same rows cut with another split seed: most of the new test rows were the champion's training rows
    new, recipe = make_job(tmp_path, untrained, "classification", rows, "  split: {seed: 7}\n", name="new")
    champion_file(new, champ)
    out = compare_with_champion(new, recipe, log=lambda m: None)
    n_test = len(datasets.load_from_disk(str(new / "prepared" / "data"))["test"])
    assert out["on_this_test"]["left_out"] >= n_test // 2, out["on_this_test"]
    assert out["on_this_test"]["rows"] + out["on_this_test"]["left_out"] == n_test
    assert (out["on_this_test"]["rows"], out["on_this_test"]["left_out"]) == by_hand(good, new, champ)[1:]


def test_labels_in_another_order_are_matched_by_name(tmp_path, models, tokenizer):
    """A champion whose head lists the labels the other way round scores the same as by hand, label by name."""
    good, _ = models
    flipped = trained_classifier(tmp_path / "flipped", tokenizer, labels=("pos", "neg"))
    champ, _ = make_job(tmp_path, good, "classification", keyword_rows(200, seed=3), name="champ")
    new, recipe = make_job(tmp_path, flipped, "classification", keyword_rows(200, seed=5), name="new")
    (new / "model" / "labels.json").write_text(json.dumps(["pos", "neg"]))  # its own order, as its config says
    champion_file(new, champ)
    out = compare_with_champion(new, recipe, log=lambda m: None)
    assert out["on_this_test"]["challenger"]["accuracy"] == pytest.approx(by_hand(flipped, new, champ)[0])
    assert out["on_this_test"]["challenger"]["accuracy"] < 0.2, "trained on flipped names: wrong by name"


def test_what_cannot_be_compared_is_said_and_the_job_goes_on(tmp_path, models):
    good, untrained = models
    champ, _ = make_job(tmp_path, good, "classification", keyword_rows(200, seed=3), name="champ")
    new, recipe = make_job(tmp_path, untrained, "classification", keyword_rows(200, seed=4), name="new")
    assert compare_with_champion(new, recipe) is None, "no champion.json: nothing to compare"

    champion_file(new, champ)
    shutil.rmtree(champ / "model")
    out = compare_with_champion(new, recipe, log=lambda m: None)
    assert out == {"model": "topics", "version": 1, "job_id": "champ", "metric": "accuracy",
                   "note": f"{champ / 'model'} holds no model (its job folder was removed or never finished)"}
    shutil.copytree(good, champ / "model")
    shutil.rmtree(champ / "prepared")  # which rows it trained on is unknown: no fair comparison
    out = compare_with_champion(new, recipe, log=lambda m: None)
    assert out["note"] == f"{champ / 'prepared' / 'data'} is gone: the rows the champion trained on are unknown"
    (new / "champion.json").write_text(json.dumps({**json.loads((new / "champion.json").read_text()),
                                                    "model_dir": "/etc"}))
    assert compare_with_champion(new, recipe, log=lambda m: None)["note"].startswith(
        "champion.json's model_dir '/etc' is outside the artifacts folder")

    (new / "champion.json").write_text('{"model": "topics", "version": "1; DROP TABLE"}')
    out = compare_with_champion(new, recipe, log=lambda m: None)
    assert out["note"].startswith("champion.json is not what the server writes")
    (new / "champion.json").write_text("\0\0\0")
    assert compare_with_champion(new, recipe, log=lambda m: None)["note"] == \
        "champion.json cannot be read (JSONDecodeError)"


def test_prepared_data_without_row_digests_is_refused(tmp_path, models):
    """A champion prepared by an earlier runner has no `content` column: which rows it trained on is unknown."""
    import datasets

    good, untrained = models
    champ, _ = make_job(tmp_path, good, "classification", keyword_rows(200, seed=3), name="champ")
    new, recipe = make_job(tmp_path, untrained, "classification", keyword_rows(200, seed=4), name="new")
    data = datasets.load_from_disk(str(champ / "prepared" / "data"))
    datasets.DatasetDict({k: v.remove_columns("content") for k, v in data.items()}).save_to_disk(
        str(tmp_path / "old"))
    shutil.rmtree(champ / "prepared" / "data")
    shutil.move(tmp_path / "old", champ / "prepared" / "data")
    champion_file(new, champ)
    assert compare_with_champion(new, recipe, log=lambda m: None)["note"].startswith(
        "the champion's prepared data was written by an earlier runner, without the row digests")
