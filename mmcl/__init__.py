"""mmcl: multimodal continual learning. Any backbone x any approach x any task sequence."""
__version__ = "0.1.0"
