"""Text data a run needs: WikiText-2 for evaluation and calibration (a leaf: any room may import it)."""
