"""Prefect flows. They only wire stages from ``tasks/`` together; no business logic lives here."""
