"""vaebm core library: models, sampling, objectives, training, tracking, evaluation."""
