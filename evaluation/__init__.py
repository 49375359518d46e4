"""Evaluation of control fidelity: edge metrics (`evaluation.edge_metrics`) and generating from held-out
pairs to score them (`evaluation.fidelity`)."""
