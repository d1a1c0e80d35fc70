"""Deployment job definitions: Vertex AI CustomJobs and Kubeflow (TFJob, KFP pipeline)."""
