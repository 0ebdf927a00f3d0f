"""The demo: simulated upstream services, a seeded catalog, and the whole product in one process."""
