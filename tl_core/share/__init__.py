"""Sharing a trained model: loading a run or bundle, prediction, the model card, verified exports, the HTML
report, and the plotly figures the app and the report both draw."""
