"""The code MLflow runs to load the detector's pyfunc model (MLflow's *models from code*).

Loading the model imports this file instead of unpickling a Python object: what runs is this
project's code, and the weights are read as tensors (:meth:`AUPredictor.from_dir`).
"""

import mlflow

from lightning_modules.serving.pyfunc import AUModel

mlflow.models.set_model(AUModel())
