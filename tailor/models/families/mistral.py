"""Mistral: the Llama layout plus `sliding_window`. A window shorter than the context is honoured by
capping the context at the window, where sliding-window attention is full attention."""
from tailor.models.families._common import Family

FAMILY = Family(model_type="mistral", sliding_key="sliding_window")
