"""The API's routers, one per concern: predict, feedback, admin (reload) and status (health,
model, metrics). Handlers are small: they read the app's `ServerState` and call the modules
that do the work."""
