"""Using a trained run (llmkern.train.inference): `llmkern eval` scores a run as its trainer validated it."""

import random

import pytest
from test_train import tiny_config

from llmkern.data.shards import tokenize_documents
from llmkern.train import Trainer
from llmkern.train.inference import evaluate_run


@pytest.fixture(scope="module")
def short_documents_dir(tmp_path_factory):
    """Documents of one short sentence: every 32-token window spans several, so document masking matters."""
    rng = random.Random(0)
    docs = [f"{rng.choice(['the cat', 'a dog', 'my bird'])} {rng.choice(['sees', 'eats'])} "
            f"{rng.choice(['fish', 'bread'])}." for _ in range(400)]
    path = str(tmp_path_factory.mktemp("short_docs"))
    tokenize_documents(docs, "bytes", path, val_fraction=0.15, seed=0)
    return path


@pytest.mark.parametrize("document_masking", [True, False])
def test_evaluate_run_scores_as_the_trainer_validated(tmp_path, short_documents_dir, document_masking):
    # A run trained with document masking was scored without it (each token seeing the documents before it, at
    # positions that do not restart): another loss than the trainer's validation for the same windows, silently.
    trainer = Trainer(tiny_config(tmp_path / "run", short_documents_dir, max_steps=3, eval_steps=2,
                                  document_masking=document_masking))
    trainer.fit()
    validated = trainer.evaluate()  # eval_steps * grad_accum batches of micro_batch windows, from the start
    batches = trainer.config.eval_steps * trainer.grad_accum
    scored = evaluate_run(trainer.run_dir, short_documents_dir, batch_size=trainer.config.micro_batch,
                          max_batches=batches, device="cpu", seq_len=trainer.config.seq_len)
    assert scored["tokens"] == batches * trainer.config.micro_batch * trainer.config.seq_len
    assert scored["loss"] == pytest.approx(validated, rel=1e-6)
