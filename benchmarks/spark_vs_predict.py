"""The logged model on a local Spark against ``au-detect predict``, on the same folder of photos.

Both run the same logged MLflow model (two ResNet-18 branches at 96 px, random weights, which do
not change the cost) end to end on the same SynthAU scenes (some with two people), alternating in
one process on one machine: ``predict`` (:func:`experiments.predict.predict`: the model's
predictor downloaded and loaded, the folder read, rows written to a CSV) and the Spark recipe
(:mod:`lightning_modules.serving.spark`: ``read_images``, ``predict_faces`` through
``mlflow.pyfunc.spark_udf``, rows written to Parquet) on ``local[--cores]``. The table gives the
medians over repeats of the seconds, images/s and the ratio to ``predict``. Spark's first run,
where its Python workers start and import PyTorch and MLflow, is timed apart, before the repeats;
so is the session's start.

    python benchmarks/spark_vs_predict.py [--scenes 200] [--repeats 3] [--cores 2] [--batch 64]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compare import alternate  # noqa: E402
from datamodules.alignment.align import AlignmentSettings  # noqa: E402
from datamodules.synthau.generate import SynthAUSettings, generate_synthau  # noqa: E402
from lightning_modules.au_detector import AUNet  # noqa: E402
from lightning_modules.serving.predictor import AUPredictor  # noqa: E402

SPEC = {"aus": None, "backbone": "resnet18", "branches": ["face", "emotion"], "aux_heads": False}


def logged_model(folder: Path, crop: int) -> str:
    """A detector with random weights (seed 0) logged into a SQLite store in ``folder``; the store
    becomes MLFLOW_TRACKING_URI (what predict and Spark read). Returns ``runs:/<id>/model``."""
    import mlflow

    from lightning_modules.serving.pyfunc import log_model

    uri = f"sqlite:///{folder}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("spark", artifact_location=str(folder / "artifacts")))
    torch.manual_seed(0)
    net = AUNet(backbone=SPEC["backbone"], branches=SPEC["branches"])
    predictor = AUPredictor(net, AlignmentSettings(crop_size=crop), {**SPEC, "aus": list(net.aus)}, device="cpu")
    with mlflow.start_run() as run:
        log_model(predictor)
    return f"runs:/{run.info.run_id}/model"


def with_predict(model: str, folder: Path, out: Path) -> tuple[float, int]:
    """``au-detect predict --model <model> --input <folder> --out <out>``, in this process."""
    from experiments.predict import predict

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        predict(model, [str(folder)], str(out))
    seconds = time.perf_counter() - start
    with open(out) as f:
        faces = sum(",ok," in line for line in f)
    return seconds, faces


def with_spark(spark, model: str, folder: Path, out: Path) -> tuple[float, int]:
    """The recipe: the folder's images through the model's Spark UDF, a row per face, to Parquet."""
    from lightning_modules.serving.spark import predict_faces, read_images

    start = time.perf_counter()
    predict_faces(read_images(spark, str(folder)), model).write.mode("overwrite").parquet(str(out))
    seconds = time.perf_counter() - start
    return seconds, spark.read.parquet(str(out)).where("status = 'ok'").count()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="Spark's local[N]")
    parser.add_argument("--batch", type=int, default=64, help="spark.sql.execution.arrow.maxRecordsPerBatch")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads of predict")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["PYSPARK_PYTHON"] = sys.executable  # Spark's Python workers: this interpreter, not python3 on PATH
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from pyspark.sql import SparkSession

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synthau"
        generate_synthau(root, SynthAUSettings(num_images=args.scenes, seed=321, val_fraction=0, test_fraction=0))
        folder = root / "images"
        images = len(list(folder.rglob("*.jpg")))
        model = logged_model(Path(tmp), args.crop)
        start = time.perf_counter()
        spark = (SparkSession.builder.master(f"local[{args.cores}]").appName("au-detect-benchmark")
                 .config("spark.driver.memory", "2g").config("spark.ui.enabled", "false")
                 .config("spark.ui.showConsoleProgress", "false")
                 .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(args.batch)).getOrCreate())
        spark.sparkContext.setLogLevel("ERROR")
        session_s = time.perf_counter() - start
        first_s, _ = with_spark(spark, model, folder, Path(tmp) / "first.parquet")
        partitions = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(str(folder)).rdd.getNumPartitions()
        results = alternate({
            "au-detect predict (baseline)": lambda: with_predict(model, folder, Path(tmp) / "rows.csv"),
            f"Spark local[{args.cores}]: spark_udf, exploded": lambda: with_spark(spark, model, folder, Path(tmp) / "rows.parquet"),
        }, args.repeats)
        spark.stop()
    print(f"\n{images} SynthAU scenes of 640x480, network 2 x resnet18 at {args.crop} px, {args.repeats} repeats, "
          f"{args.threads} torch threads in predict, Spark local[{args.cores}] ({partitions} partitions, Arrow batches "
          f"of {args.batch}), device cpu; Spark session start {session_s:.1f} s, its first run (Python workers start) "
          f"{first_s:.1f} s\n")
    base = statistics.median(s for s, _ in next(iter(results.values())))
    width = max(len(name) for name in results)
    print(f"| {'pipeline':<{width}} | seconds (median) | images/s | faces found | vs predict (time) |")
    print(f"|{'-' * (width + 2)}|------------------|----------|-------------|-------------------|")
    for name, runs in results.items():
        seconds = statistics.median(s for s, _ in runs)
        print(f"| {name:<{width}} | {seconds:16.1f} | {images / seconds:8.1f} | {runs[0][1]:11d} | {seconds / base:16.2f}x |")


if __name__ == "__main__":
    main()
