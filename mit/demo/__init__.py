"""Demonstrations on a real model (``mit demo digits``); optional part (``pip install "mit[demo]"``: scikit-learn for
the digit images, matplotlib for the plots)."""
