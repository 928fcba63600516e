"""Evaluation of frozen or fine-tuned encoders: kNN, linear probe, fine-tuning (a registry of protocols), the
representation diagnostics the training monitors use, and TensorBoard's projector. Plain torch: no Ray here."""
