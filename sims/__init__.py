"""The apps: the Flower app (main: ServerApp + relaying ClientApp), where users' trainers run (user_trainers,
trainer) and the provider's classification service (serve, on Ray Serve)."""
