"""Many adapters in one model: what an adapter holds is released when it is deleted, a mixed batch leaves no
second copy of the adapters alive, and loading touches only the new adapter's modules.

Memory is measured as the bytes of the distinct tensor storages reachable from live objects (``gc``), so a
cache anywhere in the model or in lora_engine's modules counts. Timing targets (load flat in the number
loaded) live in the benchmark suite, not here.
"""

import gc
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import lora_engine
from lora_engine.layers.base import LoraLayer

ADAPTERS = 12
CONFIG = dict(r=8, lora_alpha=16, target_modules="all-linear")


def live_tensor_bytes() -> int:
    """Bytes of the distinct CPU storages of every tensor the garbage collector can see."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some of torch's lazy module attributes warns
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and not obj.is_meta]
    # Fake tensors (torch.compile's tracing, e.g. left by an earlier test in this process) hold no memory.
    tensors = [tensor for tensor in tensors if not isinstance(tensor, FakeTensor)]
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def adapter_bytes(model, name: str) -> int:
    return sum(
        param.numel() * param.element_size()
        for _, module in model.named_modules()
        if isinstance(module, LoraLayer)
        for param in module.adapter_parameters(name)
    )


@pytest.fixture
def many(llama_factory):
    model = lora_engine.get_peft_model(llama_factory(), lora_engine.LoraConfig(**CONFIG))
    for index in range(1, ADAPTERS):
        model.add_adapter(f"a{index}", lora_engine.LoraConfig(**CONFIG))
    for _, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for name in module.adapter_names:
                torch.nn.init.normal_(module.lora_factors(name)[1])
    return model.eval()


def mixed_batch(model) -> None:
    names = ["default", *(f"a{index}" for index in range(1, ADAPTERS))]
    with torch.no_grad():
        model(input_ids=torch.randint(0, 64, (len(names), 6)), adapter_names=names)


def test_a_mixed_batch_keeps_no_second_copy_of_the_adapters(many):
    before = live_tensor_bytes()
    all_adapters = sum(adapter_bytes(many, name) for name in many.peft_config)
    mixed_batch(many)
    after = live_tensor_bytes()
    # A stacked copy of every adapter would add all_adapters bytes; allow 10% of that for unrelated objects.
    assert after - before <= 0.1 * all_adapters, f"{after - before} bytes more after a mixed batch"


def test_deleting_adapters_after_a_mixed_batch_releases_all_they_held(many):
    before_batch = live_tensor_bytes()
    deleted = [f"a{index}" for index in range(1, ADAPTERS)]
    deleted_bytes = sum(adapter_bytes(many, name) for name in deleted)
    mixed_batch(many)
    for name in deleted:
        many.delete_adapter(name)
    # Measured from before the batch: whatever the batch cached for these adapters must be gone too.
    released = before_batch - live_tensor_bytes()
    assert released >= deleted_bytes, (
        f"deleting released {released} of the {deleted_bytes} bytes the adapters held"
    )
    assert list(many.peft_config) == ["default"]


def test_load_adapter_touches_no_other_adapter_modules(many, tmp_path, monkeypatch):
    # The walks of a load skip the adapters already loaded: no module of a loaded adapter's factors is visited
    # by state_dict, load_state_dict or train/eval, the whole-model walks whose cost grew with every adapter.
    many.save_pretrained(tmp_path, selected_adapters=["a1"])
    visited = []
    factors = {
        id(module)
        for _, layer in many.named_modules()
        if isinstance(layer, LoraLayer)
        for name in layer.adapter_names
        for module in layer.adapter_modules(name)
    }
    for hook_name in ("_load_from_state_dict", "_save_to_state_dict", "train"):
        original = getattr(torch.nn.Module, hook_name)

        def spy(self, *args, _original=original, _hook=hook_name, **kwargs):
            if id(self) in factors:
                visited.append(_hook)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.nn.Module, hook_name, spy)
    many.load_adapter(tmp_path / "a1", adapter_name="again")
    assert visited == []
    assert "again" in many.peft_config


def test_load_and_delete_leave_no_reference_cycles(many, tmp_path):
    # Garbage in cycles is freed only by the collector, whose full passes walk every tracked object: a cycle per
    # load would make loads grow with the objects already alive. Refcounting alone must free what a delete drops.
    many.save_pretrained(tmp_path, selected_adapters=["a1"])
    many.load_adapter(tmp_path / "a1", adapter_name="warm-up")  # first-call caches are not garbage
    many.delete_adapter("warm-up")
    gc.collect()
    gc.disable()
    try:
        many.load_adapter(tmp_path / "a1", adapter_name="again")
        many.set_adapter("again")
        many.delete_adapter("again")
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert unreachable == 0
