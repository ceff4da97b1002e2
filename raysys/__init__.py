"""raysys: hybrid-batch training and LAReQA evaluation of multilingual dense retrievers on Ray."""

__version__ = "0.1.0"
