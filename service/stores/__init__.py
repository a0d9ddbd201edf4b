"""Label-set stores: one interface (:mod:`.base`), SQLite (embedded default) and PostgreSQL (a fleet)."""
