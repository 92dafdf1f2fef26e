"""Predict stage: regressors over the latency database, per signature."""

from dooly.predict.models import Prediction
from dooly.predict.predictor import Predictor
from dooly.predict.step import StepPrediction, predict_step

__all__ = ["Prediction", "Predictor", "StepPrediction", "predict_step"]
