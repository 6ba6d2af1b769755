"""setrain: `setrain.train(overrides=[...])` trains from Python as `python train.py` does (setrain.api)."""


def __getattr__(name: str):
    """`setrain.train`, imported on first use, so that `import setrain.errors` and the other small
    modules do not load torch and Hydra."""
    if name == "train":
        from setrain.api import train

        return train
    raise AttributeError(f"module 'setrain' has no attribute {name!r}")
