"""matplotlib for the commands that draw figures; it is the optional `analysis` extra."""

# Figures a person can put on a slide: 160 dpi, text readable at a third of the slide's width.
SLIDE_STYLE = {
    "savefig.dpi": 160,
    "savefig.bbox": "tight",
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 10,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
}

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
    matplotlib.rcParams.update(SLIDE_STYLE)
    from matplotlib import pyplot

    return pyplot
