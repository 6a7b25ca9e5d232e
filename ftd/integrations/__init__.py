"""ftd inside the trainers people use: `ftd.integrations.transformers` (Hugging Face `Trainer`) and
`ftd.integrations.lightning` (PyTorch Lightning `Trainer`).

Each submodule imports its framework; this package imports nothing optional, and `import ftd`
imports neither. Install the extras: `pip install 'ftd[hf]'`, `pip install 'ftd[lightning]'`.
"""

from __future__ import annotations

__all__: list[str] = []
