"""Training: the DeepSpeed engine (``engine``) and the learning-rate schedule (``schedule``)."""
