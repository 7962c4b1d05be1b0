"""Shared test setup.

Without a GPU, Triton kernels run in its CPU interpreter: TRITON_INTERPRET must be set before
any @triton.jit function is defined, so it is set here, before the tests import llmkern.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton attention runs its first candidate tile instead of autotuning: each tuning key would
# otherwise compile and time every candidate, in every test process. test_attention runs every
# candidate on its own, and the autotuned path once (llmkern/triton/attention.py, TILE_ENV).
os.environ.setdefault("LLMKERN_TRITON_ATTENTION_TILE", "0")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cuda_emulator(request):
    """Tests marked `simt` run the cuda backend's kernels on CPU tensors in the emulator."""
    if request.node.get_closest_marker("simt") is None:
        yield
        return
    import simt

    try:
        module = simt.module()
    except simt.Unavailable as e:
        pytest.skip(f"the CUDA emulator cannot be built here: {e}")
    with simt.emulating(module):
        yield


@pytest.fixture
def shared_data():
    """Path of ../shared/data (real text and tokenizer files); skips when it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is not here")
    return os.path.abspath(SHARED_DATA)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def outputs_after_fit(monkeypatch):
    """record(module, *inputs) -> {}: from then on, each fine-tuning fit() that a recipe calls as module.fit
    leaves in it ["out"], the trained model's eval-mode output on the inputs, as training leaves the model
    (before anything is saved or merged)."""
    import torch

    def record(module, *inputs):
        seen = {}
        real_fit = module.fit

        def fit_and_record(model, *args, **kwargs):
            result = real_fit(model, *args, **kwargs)
            with torch.no_grad():
                seen["out"] = model.eval()(*inputs)
            return result

        monkeypatch.setattr(module, "fit", fit_and_record)
        return seen

    return record
