"""The logged model on Spark (lightning_modules.serving.spark): a folder of SynthAU scenes, a photo
without a face and files that are no image, read by Spark and run through ``mlflow.pyfunc.spark_udf``,
give the rows ``au-detect predict`` writes for the same folder."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("pyspark")
pytestmark = pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")

from lightning_modules.serving.spark import image_pattern, predict_faces, read_images  # noqa: E402

from .training_helpers import log_untrained_model, write_mlflow_yaml  # noqa: E402

SPEC = {"aus": [1, 2, 12], "backbone": "resnet18", "branches": ["face"], "aux_heads": False}
NUMBERS = ["x0", "y0", "x1", "y1", "confidence", *[f"{p}_{c}" for p in ("left_eye", "right_eye", "nose", "mouth_left",
                                                                        "mouth_right") for c in "xy"]]


@pytest.fixture(scope="session")
def spark():
    """A local Spark of 2 cores for the whole run, its Python workers this interpreter; stopped at the end."""
    from pyspark.sql import SparkSession

    patch = pytest.MonkeyPatch()
    patch.setenv("PYSPARK_PYTHON", sys.executable)  # what Spark starts its Python workers with (default: python3)
    session = (SparkSession.builder.master("local[2]").appName("au-detect-tests")
               .config("spark.driver.memory", "1g")
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.shuffle.partitions", "2")
               .config("spark.sql.execution.arrow.maxRecordsPerBatch", "8")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
    patch.undo()


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A small detector with random weights logged as an MLflow model (MTCNN finds the faces; the
    AU probabilities are the random network's, as good for comparing as trained ones)."""
    tmp = tmp_path_factory.mktemp("spark-model")
    uri, model = log_untrained_model(tmp, "spark", SPEC)
    return {"uri": uri, "model": model, "settings": write_mlflow_yaml(tmp / "mlflow.yaml", uri)}


@pytest.fixture(scope="module")
def photos(synthau, tmp_path_factory) -> Path:
    """Ten SynthAU scenes (some with two people) in two folders, one under a name with a space and
    an accent, a grey picture (no face), a file that is no image, an empty file, and a scene named
    like Spark's hidden files."""
    folder = tmp_path_factory.mktemp("spark-photos") / "photos"
    scenes = sorted((synthau / "images").rglob("*.jpg"))[:10]
    for i, scene in enumerate(scenes):
        target = folder / ("a" if i < 6 else "b") / (scene.name if i != 3 else "scène 3.jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(scene, target)
    cv2.imwrite(str(folder / "grey.png"), np.full((120, 160, 3), 128, np.uint8))
    (folder / "b" / "broken.jpg").write_bytes(b"GIF89a, or not quite: no image here")
    (folder / "b" / "empty.jpg").write_bytes(b"")
    shutil.copy(scenes[0], folder / "_underscored.jpg")
    return folder


def _by_face(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.assign(face=rows["face"].fillna(-1).astype(int)).set_index(["source", "face"]).sort_index()


@pytest.mark.slow  # Spark's Python workers import torch and MLflow first: about a minute on 2 cores
def test_spark_rows_are_predicts_rows(spark, logged, photos, tmp_path):
    from experiments.predict import predict

    mlflow.set_tracking_uri(logged["uri"])
    images = read_images(spark, str(photos))
    assert images.columns == ["source", "image"]
    rows = predict_faces(images, logged["model"]).toPandas()

    predict(logged["model"], [str(photos)], str(tmp_path / "rows.csv"), mlflow=str(logged["settings"]))
    expected = pd.read_csv(tmp_path / "rows.csv", keep_default_na=False, na_values=[""])
    model = mlflow.pyfunc.load_model(logged["model"])
    # the columns of the model's answer, in its order: predict's but the person of a video
    assert rows.columns.tolist() == list(model.metadata.signature.outputs.input_names())
    assert [c for c in expected.columns if c != "person"] == rows.columns.tolist()

    # What Spark does not list gets no row: an empty file, a name starting with "_".
    left_out = {str(photos / "b" / "empty.jpg"): "empty", str(photos / "_underscored.jpg"): "ok"}
    assert {s: expected.loc[expected["source"] == s, "status"].iloc[0] for s in left_out} == left_out
    expected = expected[~expected["source"].isin(left_out)]

    got, want = _by_face(rows), _by_face(expected)
    assert got.index.tolist() == want.index.tolist()
    assert str(photos / "a" / "scène 3.jpg") in got.index.get_level_values("source")
    assert (got.index.get_level_values("face") == 1).any()  # an image of two faces: two rows
    assert got["status"].tolist() == want["status"].tolist()
    assert got.loc[str(photos / "grey.png"), "status"].tolist() == ["no_face"]
    assert got.loc[str(photos / "b" / "broken.jpg"), "status"].tolist() == ["unreadable"]
    # messages name the file, as predict's do
    assert got["message"].fillna("").tolist() == want["message"].fillna("").tolist()
    assert got.loc[str(photos / "b" / "broken.jpg"), "message"].iloc[0].startswith(str(photos / "b" / "broken.jpg") + ": ")

    names = ["AU1", "AU2", "AU12"]
    probs = [f"{n}_prob" for n in names]
    ok = got["status"] == "ok"
    difference = np.abs(got.loc[ok, probs].to_numpy() - want.loc[ok, probs].to_numpy()).max()
    print(f"\n{ok.sum()} faces; largest difference of a probability: {difference:.2g}")
    assert difference <= 1e-5
    np.testing.assert_array_equal(got.loc[ok, names].to_numpy(), want.loc[ok, names].to_numpy())
    np.testing.assert_allclose(got.loc[ok, NUMBERS].to_numpy(), want.loc[ok, NUMBERS].to_numpy(), atol=0.11)
    assert got.loc[~ok, probs + names + NUMBERS].isna().all().all()


def test_the_model_answers_per_image_with_the_same_values(logged, photos):
    """The pandas answer stays a row per face; ``rows="images"`` (what the UDF asks) holds the same
    rows, one list per input row, and an unknown ``rows`` is refused."""
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(logged["uri"])
    model = mlflow.pyfunc.load_model(logged["model"])
    paths = [photos / "grey.png", *sorted((photos / "a").glob("*.jpg"))[:3], photos / "b" / "broken.jpg"]
    frame = pd.DataFrame({"image": [p.read_bytes() for p in paths]})
    flat = model.predict(frame)
    assert flat["source"].tolist()[0] == 0 and flat["source"].is_monotonic_increasing
    grouped = model.predict(frame, params={"rows": "images"})
    assert grouped.columns.tolist() == ["faces"] and len(grouped) == len(paths)
    again = pd.DataFrame([r for faces in grouped["faces"] for r in faces], columns=flat.columns)
    pd.testing.assert_frame_equal(again, flat)
    assert [len(f) for f in grouped["faces"]] == flat.groupby("source").size().tolist()
    with pytest.raises(MlflowException, match="params rows='people'"):
        model.predict(frame, params={"rows": "people"})


@pytest.mark.slow  # a Spark session (a JVM) starts first
def test_the_pattern_takes_predicts_suffixes_in_any_case(spark, tmp_path):
    for name in ("a.jpg", "b.JPEG", "c.Png", "d.txt", "e.mp4", "f.jpg.bak"):
        (tmp_path / name).write_bytes(b"x")
    found = sorted(Path(r.source).name for r in read_images(spark, str(tmp_path)).select("source").collect())
    assert found == ["a.jpg", "b.JPEG", "c.Png"]
    assert image_pattern((".jpg",)) == "*.{[jJ][pP][gG]}"


@pytest.mark.slow  # a Spark session (a JVM) starts first
def test_a_model_logged_without_the_rows_parameter_is_refused(spark, tmp_path, monkeypatch):
    from lightning_modules.serving import pyfunc

    monkeypatch.setattr(pyfunc, "signature", lambda aus, intensity=False: pyfunc.ModelSignature(
        inputs=pyfunc.Schema([pyfunc.ColSpec("binary", "image")]), outputs=pyfunc.Schema([pyfunc.ColSpec("string", "status")])))
    uri, model = log_untrained_model(tmp_path, "old", SPEC)
    images = spark.createDataFrame([("x.jpg", b"")], "source string, image binary")
    with pytest.raises(ValueError, match="no inference parameter 'rows'"):
        predict_faces(images, model)
