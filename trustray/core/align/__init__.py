"""Alignment with few labels: reward models that know when they are unsure, calibration, acquisition functions."""
