"""Integrations with trainers users already run. Each module imports its framework only when used:
``transformers`` (PacaTrainer, PacaTrainerMixin, PacaCallback) and ``gaudi`` (optimum-habana).
May import train, data, files, distributed and below; not cli."""
