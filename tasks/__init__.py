"""One module per pipeline stage: a pure, typed core plus a thin Prefect ``@task`` wrapper."""
