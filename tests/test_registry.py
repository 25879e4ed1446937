"""Registry aliases: every registered fit is ``candidate``; ``au-detect promote`` moves ``champion``;
``au-detect predict`` and ``mlflow models serve`` load ``models:/<name>@champion``."""

from __future__ import annotations

import base64
import csv
import json
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from experiments.cli import main
from experiments.lightning_cli import AUDetectCLI
from experiments.registry import RegistryError, promote

from .training_helpers import (SMALL_FIT_EXPERIMENT, SMALL_FIT_MODEL, served_model, small_fit_args,
                               write_mlflow_yaml)

MODEL = SMALL_FIT_MODEL


@pytest.fixture(scope="module")
def fits(small_fit, synthau):
    """Two small fits registered under MODEL: the session's (seed 0) and one of seed 1 (other
    weights) into the same store; the alias ``candidate`` as read after each."""
    tmp, settings, client = small_fit["tmp"], small_fit["mlflow_yaml"], small_fit["client"]
    cli = AUDetectCLI(args=["fit", *small_fit_args(synthau, small_fit["cache"], Path(settings), tmp / "runs_seed1",
                                                   epochs=1, train_batches=2), "--seed_everything", "1"])
    runs = [small_fit["run_id"], cli.trainer.logger.run_id]
    candidates = [small_fit["before_test"]["candidate"], client.get_model_version_by_alias(MODEL, "candidate")]
    # the same settings without a registered name (what promote falls back on)
    plain = tmp / "plain.yaml"
    write_mlflow_yaml(plain, small_fit["uri"], SMALL_FIT_EXPERIMENT)
    return {"uri": small_fit["uri"], "yaml": settings, "plain": str(plain), "runs": runs, "candidates": candidates,
            "client": client, "tmp": tmp}


def aliases(client, version: str) -> list[str]:
    return list(client.get_model_version(MODEL, version).aliases)


def predict_rows(model: str, image, out, settings: str) -> list[dict]:
    main(["predict", "--model", model, "--input", str(image), "--out", str(out), "--mlflow", settings])
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def probabilities(rows: list[dict]) -> np.ndarray:
    return np.array([[float(v) for k, v in r.items() if k.endswith("_prob")] for r in rows])


@pytest.fixture(scope="module")
def scene(synthau, truth, tmp_path_factory):
    """A SynthAU scene with two faces."""
    ref = next(ref for ref, r in truth.items() if len(r["faces"]) == 2)
    image = tmp_path_factory.mktemp("scene") / "scene.jpg"
    shutil.copy(synthau / ref, image)
    return image


@pytest.mark.slow
def test_each_registered_fit_is_the_candidate(fits):
    first, second = fits["candidates"]
    assert (str(first.version), first.run_id) == ("1", fits["runs"][0])  # after the first fit
    assert (str(second.version), second.run_id) == ("2", fits["runs"][1])  # moved by the second
    assert "candidate" in aliases(fits["client"], "2") and "candidate" not in aliases(fits["client"], "1")


@pytest.mark.slow
def test_promote_moves_the_alias_between_versions(fits, capsys):
    runs, settings, client = fits["runs"], fits["yaml"], fits["client"]
    main(["promote", "--model", f"runs:/{runs[0]}/model", "--alias", "champion", "--mlflow", settings])
    assert f"{MODEL}@champion: no version -> version 1 (run {runs[0]})" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    result = promote(f"runs:/{runs[1]}/model", "champion", mlflow=settings)
    assert (result["previous"], result["version"], result["run_id"]) == ("1", "2", runs[1])
    assert f"version 1 (run {runs[0]}) -> version 2 (run {runs[1]})" in capsys.readouterr().out
    assert sorted(aliases(client, "2")) == ["candidate", "champion"]
    assert "champion" not in aliases(client, "1")
    # by version, by alias; and again onto the same version
    assert promote(f"models:/{MODEL}/1", "champion", mlflow=settings)["version"] == "1"
    assert promote(f"models:/{MODEL}@candidate", "champion", mlflow=settings)["version"] == "2"
    assert promote(f"models:/{MODEL}@candidate", "champion", mlflow=settings)["previous"] == "2"
    assert "already version 2" in capsys.readouterr().out
    assert promote(f"models:/{MODEL}/latest", "newest", mlflow=settings)["version"] == "2"


@pytest.mark.slow
def test_a_run_model_not_yet_registered_is_registered_by_name(fits, capsys):
    client, plain = fits["client"], fits["plain"]
    experiment = client.get_experiment_by_name(SMALL_FIT_EXPERIMENT).experiment_id
    run = client.create_run(experiment, run_name="a model never registered")
    client.create_logged_model(experiment, name="model", source_run_id=run.info.run_id)
    uri = f"runs:/{run.info.run_id}/model"
    with pytest.raises(RegistryError, match=rf"model '{uri}': this run's model was never registered; pass --name"):
        promote(uri, "champion", mlflow=plain)
    # the settings' registered_model_name, as a fit's would be
    third = write_mlflow_yaml(fits["tmp"] / "third.yaml", fits["uri"], SMALL_FIT_EXPERIMENT,
                              registered_model_name="au-third")
    assert promote(uri, "staging", mlflow=str(third))["name"] == "au-third"
    assert "Registered " in capsys.readouterr().out
    # --name: registered again, under that name
    result = promote(uri, "staging", name="au-detector-other", mlflow=plain)
    assert result == {"name": "au-detector-other", "alias": "staging", "version": "1", "run_id": run.info.run_id,
                      "previous": None, "registered": True}
    assert client.get_model_version_by_alias("au-detector-other", "staging").run_id == run.info.run_id
    # registered under two names now: the settings' name decides, and without one --name must
    assert promote(uri, "staging", mlflow=str(third))["name"] == "au-third"
    with pytest.raises(RegistryError, match=r"several names \(au-detector-other, au-third\); pass --name"):
        promote(uri, "staging", mlflow=plain)
    # a fit's model already registered under MODEL is found, not registered again
    assert promote(f"runs:/{fits['runs'][0]}/model", "old", mlflow=plain)["registered"] is False


@pytest.mark.parametrize("model, alias, message", [
    ("runs:/0123456789abcdef/model", "champion", r"model 'runs:/0123456789abcdef/model': no run 0123456789abcdef at "),
    ("models:/no-such-model/1", "champion", r"model 'models:/no-such-model/1': no registered model 'no-such-model'"),
    (f"models:/{MODEL}/99", "champion", rf"model 'models:/{MODEL}/99': registered model '{MODEL}' has no version 99 at"
                                        r" .* \(its versions: 1, 2"),
    (f"models:/{MODEL}@nope", "champion", rf"model 'models:/{MODEL}@nope': registered model '{MODEL}' has no alias "
                                          r"'nope' at .* \(its aliases: .*candidate"),
    ("photos/best.ckpt", "champion", r"model 'photos/best.ckpt': expected runs:/<run id>/model, models:/<name>/"),
    (f"models:/{MODEL}/1", "v2", r"alias 'v2': letters, digits"),
])
@pytest.mark.slow
def test_clear_errors(fits, model, alias, message):
    with pytest.raises(RegistryError, match=message):
        promote(model, alias, mlflow=fits["yaml"])


@pytest.mark.slow
def test_a_run_without_a_model(fits):
    client = fits["client"]
    run = client.create_run(client.get_experiment_by_name(SMALL_FIT_EXPERIMENT).experiment_id, run_name="no model")
    with pytest.raises(RegistryError, match=rf"run {run.info.run_id} \(no model\) has no model 'model'"):
        promote(f"runs:/{run.info.run_id}/model", "champion", mlflow=fits["yaml"])


@pytest.mark.slow
def test_predict_with_the_champion_alias_is_the_version_it_names(fits, scene, tmp_path):
    """champion on version 1 while version 2 is the newest: the alias, not the latest, is loaded."""
    runs, settings = fits["runs"], fits["yaml"]
    promote(f"models:/{MODEL}/1", "champion", mlflow=settings)
    champion = predict_rows(f"models:/{MODEL}@champion", scene, tmp_path / "champion.csv", settings)
    first = predict_rows(f"runs:/{runs[0]}/model", scene, tmp_path / "first.csv", settings)
    assert len(champion) == len(first) >= 1 and all(r["status"] == "ok" for r in champion)
    np.testing.assert_array_equal(probabilities(champion), probabilities(first))
    candidate = predict_rows(f"models:/{MODEL}@candidate", scene, tmp_path / "candidate.csv", settings)
    assert np.abs(probabilities(candidate) - probabilities(champion)).max() > 1e-4  # the other fit's weights


@pytest.mark.slow
def test_mlflow_models_serve_the_champion(fits, scene, tmp_path):
    """``mlflow models serve`` of ``models:/<name>@champion``, an image posted as in the README's
    curl: the answer is ``au-detect predict``'s on the same image, with the run's model and with the
    registered version the alias names."""
    runs, settings = fits["runs"], fits["yaml"]
    promote(f"runs:/{runs[1]}/model", "champion", mlflow=settings)
    expected = predict_rows(f"runs:/{runs[1]}/model", scene, tmp_path / "second.csv", settings)
    assert predict_rows(f"models:/{MODEL}/2", scene, tmp_path / "version.csv", settings) == expected
    with served_model(f"models:/{MODEL}@champion", fits["uri"], tmp_path) as (url, _):
        body = json.dumps({"dataframe_records": [{"image": base64.b64encode(scene.read_bytes()).decode()}]})
        request = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"})
        served = json.loads(urllib.request.urlopen(request, timeout=120).read())["predictions"]
    assert len(served) == len(expected) >= 1 and all(r["status"] == "ok" for r in expected)
    names = [c[:-5] for c in expected[0] if c.endswith("_prob")]
    for s, r in zip(served, expected):
        assert s["status"] == "ok" and s["source"] == 0 and int(s["face"]) == int(float(r["face"]))
        np.testing.assert_allclose([s["x0"], s["y0"], s["x1"], s["y1"]],
                                   [float(r[k]) for k in ("x0", "y0", "x1", "y1")], atol=0.11)
        np.testing.assert_allclose([s[f"{n}_prob"] for n in names], [float(r[f"{n}_prob"]) for n in names], atol=2e-5)
        assert [int(s[n]) for n in names] == [int(r[n]) for n in names]
