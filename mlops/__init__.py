"""Shared core of the flights retraining system: settings, storage, features, typed results."""
