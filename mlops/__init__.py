"""The shared core: settings, storage, lake layout, schema, features, registry, typed results."""
