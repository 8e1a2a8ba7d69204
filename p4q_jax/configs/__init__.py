"""ml_collections configs, one file per experiment family (`--config=configs/NAME.py`)."""
