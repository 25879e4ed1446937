"""The logged model on Apache Spark: folders of photos in, one row per face out, as ``au-detect predict``.

The recipe is MLflow's own route: :func:`mlflow.pyfunc.spark_udf` runs the pyfunc model
(:mod:`lightning_modules.serving.pyfunc`) in Spark's Python workers, on Arrow batches of image bytes.
A UDF answers one value per input row, and the model answers a row per face, so the UDF asks for
the model's per-image answer (the inference parameter ``rows="images"``: each image's rows in a list)
typed from the model's signature, and the list is exploded back into a row per face:

    from pyspark.sql import SparkSession
    from lightning_modules.serving.spark import predict_faces, read_images

    spark = (SparkSession.builder.appName("au-detect")
             .config("spark.sql.execution.arrow.maxRecordsPerBatch", 64)  # images per model call
             .getOrCreate())
    images = read_images(spark, "/data/photos")              # source, image
    rows = predict_faces(images, "models:/au-detector@champion")
    rows.write.parquet("/data/au_rows.parquet")

The rows have the columns of the model's answer (those of ``predict``'s CSV but ``person``), with
``source`` the image's path as ``au-detect predict`` writes it for a folder (``file:`` dropped from
local paths; other file systems keep their URI), and the same values: probabilities and decisions,
boxes, landmarks, a ``no_face`` row for a photo without a face, an ``unreadable`` row for a file that
is no image. Spark lists the files, so what it leaves out gets no row: empty files (0 bytes), names
starting with ``_`` or ``.`` and files the pattern does not match (``predict`` gives an empty file an
``empty`` row, and reads ``_name.jpg``).

``pyspark`` is imported by the functions, not by this module: the project does not need it
(``pip install 'au-detect[spark]'`` brings it; Spark needs Java 17 or newer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from datamodules.io.images import IMAGE_SUFFIXES
from lightning_modules.serving.pyfunc import ROWS_PARAM

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

# The request limits of a server (lightning_modules.serving.pyfunc.RequestLimits) guard it against
# strangers' requests; in Spark a "request" is one Arrow batch of your own files, as many rows as
# spark.sql.execution.arrow.maxRecordsPerBatch. Those three are lifted, so that a batch is never
# refused whole; the limits of one image (max_pixels, decode_seconds) and the pixels decoded at once
# (batch_pixels) stay the model's.
BATCH_LIMITS = {"max_rows": 2**62, "max_request_bytes": 2**62, "max_request_pixels": 2**62}


def image_pattern(suffixes=IMAGE_SUFFIXES) -> str:
    """A Hadoop glob of file names with the image suffixes ``au-detect predict`` reads, in any case
    (``*.{[jJ][pP][gG],[pP][nN][gG],...}``): Spark's ``pathGlobFilter``.

    Examples:
        >>> image_pattern((".jpg", ".png"))
        '*.{[jJ][pP][gG],[pP][nN][gG]}'
    """
    either = lambda c: f"[{c.lower()}{c.upper()}]" if c.isalpha() else c  # noqa: E731
    return "*.{" + ",".join("".join(map(either, s.lstrip("."))) for s in suffixes) + "}"


def local_path(path: "Column") -> "Column":
    """Spark's path of a file (``file:/data/a.jpg``) as ``au-detect predict`` names it (``/data/a.jpg``):
    ``file:`` and ``file://`` dropped; other schemes (``s3a://``, ``hdfs://``) kept."""
    from pyspark.sql import functions as F

    return F.regexp_replace(path, r"^file:(//)?(?=/)", "")


def read_images(spark: "SparkSession", folder: str, pattern: str | None = None) -> "DataFrame":
    """The images under ``folder`` (recursively), one row each: ``source`` (the path, as
    :func:`local_path` names it) and ``image`` (the file's bytes, the model's input column).

    Spark's ``binaryFile`` source reads them, with ``recursiveFileLookup`` and ``pathGlobFilter``
    (``pattern``, a Hadoop glob of file names; default :func:`image_pattern`). ``folder`` may be any
    path Spark reads (``s3a://bucket/photos``), or a glob of paths.
    """
    from pyspark.sql import functions as F

    files = (spark.read.format("binaryFile")
             .option("recursiveFileLookup", "true")
             .option("pathGlobFilter", pattern or image_pattern())
             .load(folder))
    return files.select(local_path(F.col("path")).alias("source"), F.col("content").alias("image"))


def face_type(model_uri: str):
    """The Spark type of one face's row, from the logged model's signature: its output columns
    but ``source``. A model logged without the ``rows`` parameter (before it existed) is refused:
    its answer has a row per face, which a UDF cannot return."""
    import mlflow
    from pyspark.sql.types import StructField, StructType

    info = mlflow.models.get_model_info(model_uri)
    signature = info.signature
    params = signature.params.to_dict() if signature is not None and signature.params is not None else []
    if signature is None or signature.outputs is None or ROWS_PARAM not in [p["name"] for p in params]:
        raise ValueError(f"{model_uri}: the model's signature has no inference parameter {ROWS_PARAM!r}; "
                         "log it again with this version of au-detect (au-detect fit, or "
                         "lightning_modules.serving.pyfunc.log_model) to run it on Spark")
    # nullable: a status row has no box nor probabilities (the signature's columns say "required")
    return StructType([StructField(f.name, f.dataType, nullable=True)
                       for f in signature.outputs.as_spark_schema().fields if f.name != "source"])


def predict_faces(images: "DataFrame", model_uri: str, model_config: dict[str, Any] | None = None,
                  env_manager: str = "local") -> "DataFrame":
    """One row per face of each image of ``images`` (columns ``source`` and ``image``, as
    :func:`read_images` gives), with the logged model ``model_uri``: ``source``, then the columns
    of the model's answer, in its order (see the module's docstring).

    ``model_config`` changes the model's config as ``mlflow.pyfunc.load_model`` would (e.g.
    ``{"backend": "onnxruntime"}``, ``{"max_pixels": ...}``), over :data:`BATCH_LIMITS`.
    ``env_manager``: ``local`` runs the model in the workers' Python (this project installed
    there); ``virtualenv``/``uv``/``conda`` build the model's own environment (see
    :func:`mlflow.pyfunc.spark_udf`).

    A batch of ``spark.sql.execution.arrow.maxRecordsPerBatch`` images (Spark's default: 10,000)
    goes to the model at once, their encoded bytes in the worker's memory together: set it to a few
    dozen for photos.
    """
    import mlflow
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, StructField, StructType

    face = face_type(model_uri)
    answer = StructType([StructField("faces", ArrayType(face))])
    udf = mlflow.pyfunc.spark_udf(images.sparkSession, model_uri, result_type=answer, env_manager=env_manager,
                                  params={ROWS_PARAM: "images"},
                                  model_config={**BATCH_LIMITS, **(model_config or {})})
    faces = (images.select("source", udf(F.col("image")).alias("_answer"))
             .select("source", F.explode("_answer.faces").alias("_face")))
    columns = [F.col(f"_face.{f.name}").alias(f.name) for f in face.fields]
    # The model names an image by its row in the batch ("row 3: damaged image ..."); the path does
    # here, as in predict's messages.
    message = F.col("_face.message")
    named = F.when(message.rlike(r"^row [0-9]+: "),
                   F.concat(F.col("source"), F.regexp_replace(message, r"^row [0-9]+", ""))).otherwise(message)
    return faces.select("source", *[named.alias("message") if f.name == "message" else c
                                    for f, c in zip(face.fields, columns)])
