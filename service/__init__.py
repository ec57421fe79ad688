"""The FastAPI gateway: settings, schemas, routes, Redis history store, Triton client, catalog mapping, metrics."""
