"""fc7: AlexNet FC7 image embeddings at scale, with similarity search and classifiers.

Stages, each one module; imports flow one way (a module never imports a later stage):

    errors, config -> provenance -> sources -> decode -> model -> store -> extract
                                                                  store -> index -> search -> serve
                                                                  store -> classify
"""

__version__ = "0.1.0"
