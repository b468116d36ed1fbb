"""TL Studio's engine: transfer learning on images, with no UI.

Modules (one owner per concern, see DESIGN.md): config, errors, data (+ transforms), backbones,
features, train, evaluate, runs, jobs, export, cli.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
