"""matplotlib for the commands that draw figures; it is the optional `analysis` extra."""

from setrain.errors import SetrainError


def pyplot(command: str):
    """matplotlib's pyplot on the file-only Agg backend, or one sentence naming the extra to install."""
    try:
        import matplotlib
    except ImportError as error:
        raise SetrainError(
            f"{command} draws its figures with matplotlib, which is not installed; install it "
            "with pip install 'setrain[analysis]'."
        ) from error
    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot
