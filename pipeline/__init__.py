"""fc7: AlexNet FC7 image embeddings at scale, with similarity search and classifiers.

One module or package per stage; imports flow one way (a module never imports a later stage):

    errors, config -> provenance -> fs -> store -> sources -> decode -> model
    model, store -> extract/          (embeddings in Parquet, on Ray)
    model, store -> index/ -> search  (FAISS similarity search)
    model, store -> classify/         (scikit-learn classifiers)
    search, classify -> serve/        (HTTP service and page)

Entry points (argv parsing, printing, exit codes) live in `jobs/`, never here.
"""

__version__ = "0.1.0"
