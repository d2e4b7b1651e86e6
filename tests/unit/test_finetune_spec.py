"""The fine-tune's TrainSpec: what the recipe asks for reaches the trainer, and the checkpoint fingerprint
changes with what is trained, never with how (eager or compiled, one process or several)."""
from steps.finetune import train_spec
from tailor.config import FinetuneParams


def spec(**kw):
    return train_spec(FinetuneParams(**kw), "phone", "cfg0", "ab" * 32)


def test_compile_reaches_the_trainer():
    assert spec(compile=True).compile is True
    assert spec().compile is False


def test_fingerprint_ignores_how_a_run_trains():
    base = spec().fingerprint
    assert spec(compile=True).fingerprint == base
    assert spec(nproc=2).fingerprint == base


def test_fingerprint_names_what_is_trained():
    base = spec().fingerprint
    assert spec(lr=3e-4).fingerprint != base
    assert spec(train_embeddings=True).fingerprint != base
    assert train_spec(FinetuneParams(), "laptop", "cfg0", "ab" * 32).fingerprint != base
    assert train_spec(FinetuneParams(), "phone", "cfg1", "ab" * 32).fingerprint != base
    assert train_spec(FinetuneParams(), "phone", "cfg0", "cd" * 32).fingerprint != base
