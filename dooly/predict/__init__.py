"""Predict stage: regressors over the latency database, per signature."""

from dooly.predict.models import Prediction
from dooly.predict.predictor import Predictor
from dooly.predict.step import StepPrediction, StepPredictor, predict_step

__all__ = ["Prediction", "Predictor", "StepPrediction", "StepPredictor", "predict_step"]
