"""chatforge: train chat assistants the way ChatGPT was trained."""

__version__ = "0.1.0"
