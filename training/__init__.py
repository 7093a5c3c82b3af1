"""Training: data generation and import, training, evaluation, registration (MLflow project steps)."""
