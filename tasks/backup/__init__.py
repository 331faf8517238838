"""The backup stage: content-addressed snapshots of the state, restore, and the restore drill."""
