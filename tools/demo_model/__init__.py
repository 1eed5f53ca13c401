"""Build the bundled demo model: a tiny EncDecRNNTBPEModelWithPrompt trained on synthetic phone-call speech.

Entry point: ``python -m tools.demo_model build --out build/demo`` (see ``__main__.py``).
"""

LANGS = ["en-US", "es-ES", "de-DE"]
# Index 101 for ``auto`` follows the real nemotron checkpoint's convention.
PROMPT_DICTIONARY = {"en-US": 0, "es-ES": 1, "de-DE": 2, "auto": 101}
NUM_PROMPTS = 128
