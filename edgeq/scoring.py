"""One scoring rule for every model and runtime: accuracy for classification, MAE/MSE for regression."""

from __future__ import annotations

import numpy as np

TASKS = ("classification", "regression")


def score(pred: np.ndarray, y: np.ndarray, task: str) -> dict[str, float]:
    """Accuracy of the argmax (classification) or MAE and MSE of the outputs (regression)."""
    if task == "regression":
        err = np.asarray(pred, dtype=np.float64).reshape(-1) - np.asarray(y, dtype=np.float64).reshape(-1)
        return {"mae": float(np.mean(np.abs(err))), "mse": float(np.mean(err**2))}
    return {"accuracy": float(np.mean(np.asarray(pred).argmax(1) == np.asarray(y).reshape(-1)))}


def keras_score(model, x: np.ndarray, y: np.ndarray, task: str) -> dict[str, float]:
    """score() of a Keras model's predictions."""
    return score(model.predict(x, verbose=0, batch_size=256), y, task)


def metric_name(task: str) -> str:
    """The headline metric of a task: accuracy or mae."""
    return "mae" if task == "regression" else "accuracy"


def headline(scores: dict[str, float]) -> float:
    """The one number where higher is better: accuracy, or -MAE."""
    return float(scores["accuracy"]) if "accuracy" in scores else -float(scores["mae"])
