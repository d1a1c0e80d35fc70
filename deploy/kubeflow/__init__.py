"""Kubeflow: a Training Operator TFJob (YAML) and a KFP v2 pipeline (``pipeline.py``)."""
