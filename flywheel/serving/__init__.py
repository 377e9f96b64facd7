"""The HTTP server (`flywheel serve`): app.py builds it from routers/ over one ServerState;
champion.py swaps the served model in place. It imports no Prefect, no stage and no flow."""
