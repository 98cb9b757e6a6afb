"""fc7: AlexNet FC7 image embeddings at scale, with similarity search and classifiers.

Stages, each one module; imports flow one way (a module never imports a later stage):

    errors, config -> provenance -> store -> sources -> decode -> model

    model, store -> index -> search  (FAISS similarity search)
    model, store -> classify         (scikit-learn classifiers)
    search, classify -> serve        (HTTP service and page)
"""

__version__ = "0.1.0"
