"""The FastAPI gateway only: app, routes, deps, edge (admission), recommender, Triton client, history store, pinning."""
