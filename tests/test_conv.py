"""LoRA on nn.Conv1d / Conv2d / Conv3d, with peft 0.21.2 as the oracle: a tiny CNN (every conv kind, a strided
conv, a 1×1 conv, a grouped conv) and a tiny ViT from transformers (its patch embedding is a strided Conv2d).

Pairs are built from identical bases; peft's non-trivial adapter (``init_lora_weights=False``) is copied into ours.
"""

import copy

import peft
import pytest
import torch
from conftest import copy_lora_weights, mixed_batch_and_single_runs, move_dora_magnitudes_off_their_norms
from safetensors.torch import load_file
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

import lora_engine
from lora_engine.layers.conv import LoraConv

TOLERANCE = {"atol": 1e-6, "rtol": 1e-5}
CNN_TARGETS = ["conv1d", "strided", "pointwise", "conv3d"]  # every kind, none grouped: all mergeable
VIT_TARGETS = ["projection", "query", "value"]


class TinyCNN(nn.Module):
    """Conv1d → strided Conv2d → 1×1 Conv2d → grouped Conv2d, a Conv3d branch, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(3, 8, 3, padding=1)
        self.strided = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.pointwise = nn.Conv2d(12, 12, 1)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=2)
        self.conv3d = nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1))
        self.head = nn.Linear(12 * 4 * 4 + 4 * 2 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, 3, 8, 8]`` → ``[N, 5]``."""
        hidden = self.conv1d(x.flatten(2)).view(x.shape[0], 8, 8, 8)
        hidden = self.grouped(self.pointwise(self.strided(hidden).relu()))
        volume = self.conv3d(hidden[:, :4].reshape(x.shape[0], 2, 2, 4, 4))
        return self.head(torch.cat([hidden.flatten(1), volume.flatten(1)], dim=1))


def make_cnn(seed: int = 0) -> TinyCNN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyCNN().eval()


def make_vit(seed: int = 0) -> ViTForImageClassification:
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTForImageClassification(config).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def pixel_values() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def build_pair(make, **config):
    config.setdefault("init_lora_weights", False)
    config.setdefault("r", 4)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**copy.deepcopy(config)))
    ours = lora_engine.get_peft_model(make(), lora_engine.LoraConfig(**copy.deepcopy(config)))
    copy_lora_weights(theirs, ours)
    return theirs, ours


def trainable_names(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def cnn_out(model, images):
    with torch.no_grad():
        return model(images)


def vit_logits(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits


def assert_same_state(ours, theirs):
    their_state = theirs.state_dict()
    assert ours.state_dict().keys() == their_state.keys()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, their_state[key], **TOLERANCE, msg=key)


def assert_gradients_match(theirs, ours, loss_of):
    loss_of(theirs).backward()
    loss_of(ours).backward()
    their_grads = {name: param.grad for name, param in theirs.named_parameters() if param.requires_grad}
    our_grads = {name: param.grad for name, param in ours.named_parameters() if param.requires_grad}
    assert our_grads.keys() == their_grads.keys()
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], **TOLERANCE, msg=name)


# ---------------------------------------------------------------------------------------------- tiny CNN
def test_every_conv_kind_is_wrapped_with_peft_factor_shapes():
    theirs, ours = build_pair(make_cnn, target_modules=[*CNN_TARGETS, "grouped"])
    assert {name for name, module in ours.named_modules() if isinstance(module, LoraConv)} == {
        f"base_model.model.{name}" for name in [*CNN_TARGETS, "grouped"]
    }
    their_shapes = {key: value.shape for key, value in theirs.state_dict().items()}
    assert {key: value.shape for key, value in ours.state_dict().items()} == their_shapes


def test_cnn_trainable_parameters_match_peft():
    theirs, ours = build_pair(make_cnn, target_modules=[*CNN_TARGETS, "grouped"])
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert trainable_names(ours) == trainable_names(theirs)


def test_cnn_outputs_match_peft(images):
    theirs, ours = build_pair(make_cnn, target_modules=[*CNN_TARGETS, "grouped"])
    torch.testing.assert_close(cnn_out(ours, images), cnn_out(theirs, images), **TOLERANCE)


def test_cnn_gradients_match_peft(images):
    theirs, ours = build_pair(make_cnn, target_modules=[*CNN_TARGETS, "grouped"])
    assert_gradients_match(theirs, ours, lambda model: model(images).square().mean())


def test_cnn_with_dropout_in_training_matches_peft_under_the_same_seed(images):
    theirs, ours = build_pair(make_cnn, target_modules=CNN_TARGETS, lora_dropout=0.3)
    theirs.train()
    ours.train()
    torch.manual_seed(3)
    their_out = theirs(images)
    torch.manual_seed(3)
    torch.testing.assert_close(ours(images), their_out, **TOLERANCE)


def test_cnn_merged_weights_equal_peft():
    theirs, ours = build_pair(make_cnn, target_modules=CNN_TARGETS)
    theirs.merge_adapter()
    ours.merge_adapter()
    assert_same_state(ours, theirs)


def test_cnn_merged_outputs_equal_unmerged_outputs(images):
    _, ours = build_pair(make_cnn, target_modules=CNN_TARGETS)
    unmerged = cnn_out(ours, images)
    ours.merge_adapter()
    torch.testing.assert_close(cnn_out(ours, images), unmerged, atol=1e-5, rtol=1e-5)


def test_cnn_unmerge_restores_the_base_weights():
    base = make_cnn()
    _, ours = build_pair(make_cnn, target_modules=CNN_TARGETS)
    ours.merge_adapter()
    ours.unmerge_adapter()
    restored = dict(ours.unload().named_parameters())
    for name, param in base.named_parameters():
        torch.testing.assert_close(restored[name], param, **TOLERANCE, msg=name)


def test_cnn_merge_and_unload_equals_peft(images):
    theirs, ours = build_pair(make_cnn, target_modules=CNN_TARGETS)
    their_merged, our_merged = theirs.merge_and_unload(), ours.merge_and_unload()
    assert type(our_merged.strided) is nn.Conv2d
    torch.testing.assert_close(cnn_out(our_merged, images), cnn_out(their_merged, images), **TOLERANCE)


def test_cnn_saved_files_equal_peft_files(tmp_path):
    theirs, ours = build_pair(make_cnn, target_modules=[*CNN_TARGETS, "grouped"])
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    their_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    our_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert our_file.keys() == their_file.keys()
    for key, value in our_file.items():
        assert torch.equal(value, their_file[key]), key


def test_cnn_adapter_saved_by_peft_loads_in_lora_engine(tmp_path, images):
    theirs, _ = build_pair(make_cnn, target_modules=[*CNN_TARGETS, "grouped"])
    theirs.save_pretrained(tmp_path)
    ours = lora_engine.PeftModel.from_pretrained(make_cnn(), tmp_path)
    torch.testing.assert_close(cnn_out(ours, images), cnn_out(theirs, images), **TOLERANCE)


def test_cnn_adapter_saved_by_lora_engine_loads_in_peft(tmp_path, images):
    _, ours = build_pair(make_cnn, target_modules=[*CNN_TARGETS, "grouped"])
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_cnn(), tmp_path)
    torch.testing.assert_close(cnn_out(theirs, images), cnn_out(ours, images), **TOLERANCE)


def test_mixed_batch_of_conv_adapters_matches_peft(images):
    theirs, ours = build_pair(make_cnn, target_modules=CNN_TARGETS)
    for model, api in ((theirs, peft), (ours, lora_engine)):
        model.add_adapter(
            "other", api.LoraConfig(target_modules=["strided", "conv3d"], r=2, init_lora_weights=False)
        )
    copy_lora_weights(theirs, ours)
    theirs.eval()
    ours.eval()
    names = ["other", "__base__"]
    with torch.no_grad():
        their_out = theirs(images, adapter_names=names)
        our_out = ours(images, adapter_names=names)
    torch.testing.assert_close(our_out, their_out, **TOLERANCE)


# ------------------------------------------------------------------------------------------ special cases
def test_rank_not_divisible_by_groups_is_refused_naming_the_layer():
    config = lora_engine.LoraConfig(target_modules=["grouped"], r=3)
    with pytest.raises(ValueError, match=r"Conv2d with groups=2 and rank 3"):
        lora_engine.get_peft_model(make_cnn(), config)


def test_merging_a_grouped_conv_is_refused_like_peft():
    theirs, ours = build_pair(make_cnn, target_modules=["grouped"])
    with pytest.raises(NotImplementedError):
        theirs.merge_adapter()
    with pytest.raises(NotImplementedError, match="groups=2"):
        ours.merge_adapter()


def test_dilated_conv_adapter_merges_to_its_unmerged_output():
    """Beyond peft (whose lora_A ignores dilation and so fails on this layer): lora_A is dilated like the base."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=2, dilation=2))
    ours = lora_engine.get_peft_model(
        model, lora_engine.LoraConfig(target_modules=["0"], init_lora_weights=False)
    )
    images = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unmerged = ours(images)
        ours.merge_adapter()
        torch.testing.assert_close(ours(images), unmerged, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- tiny ViT
def test_vit_patch_embedding_and_attention_trainable_parameters_match_peft():
    theirs, ours = build_pair(make_vit, target_modules=VIT_TARGETS)
    assert isinstance(ours.base_model.model.vit.embeddings.patch_embeddings.projection, LoraConv)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert trainable_names(ours) == trainable_names(theirs)


def test_vit_logits_loss_and_gradients_match_peft(pixel_values):
    theirs, ours = build_pair(make_vit, target_modules=VIT_TARGETS)
    torch.testing.assert_close(vit_logits(ours, pixel_values), vit_logits(theirs, pixel_values), **TOLERANCE)
    labels = torch.tensor([0, 2])
    assert_gradients_match(theirs, ours, lambda model: model(pixel_values=pixel_values, labels=labels).loss)


def test_vit_adapter_round_trips_through_peft_both_ways(tmp_path, pixel_values):
    theirs, ours = build_pair(make_vit, target_modules=VIT_TARGETS)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    loaded_by_us = lora_engine.PeftModel.from_pretrained(make_vit(), tmp_path / "peft")
    loaded_by_peft = peft.PeftModel.from_pretrained(make_vit(), tmp_path / "ours")
    expected = vit_logits(theirs, pixel_values)
    torch.testing.assert_close(vit_logits(loaded_by_us, pixel_values), expected, **TOLERANCE)
    torch.testing.assert_close(vit_logits(loaded_by_peft, pixel_values), expected, **TOLERANCE)


def test_vit_merge_and_unload_equals_peft(pixel_values):
    theirs, ours = build_pair(make_vit, target_modules=VIT_TARGETS)
    their_merged, our_merged = theirs.merge_and_unload(), ours.merge_and_unload()
    assert type(our_merged) is ViTForImageClassification
    torch.testing.assert_close(
        vit_logits(our_merged, pixel_values), vit_logits(their_merged, pixel_values), **TOLERANCE
    )


# ------------------------------------------------------------------------------------------------- DoRA
def test_conv_dora_magnitudes_and_trainable_parameters_match_peft():
    theirs, ours = build_pair(make_cnn, target_modules=CNN_TARGETS, use_dora=True)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert_same_state(ours, theirs)  # the magnitudes included: [1, out, 1, ...] as in peft


def test_conv_dora_outputs_and_gradients_match_peft(images):
    theirs, ours = build_pair(make_cnn, target_modules=CNN_TARGETS, use_dora=True)
    torch.testing.assert_close(cnn_out(ours, images), cnn_out(theirs, images), **TOLERANCE)
    assert_gradients_match(theirs, ours, lambda model: model(images).square().mean())


def test_conv_dora_with_dropout_in_training_matches_peft_under_the_same_seed(images):
    theirs, ours = build_pair(make_cnn, target_modules=CNN_TARGETS, use_dora=True, lora_dropout=0.3)
    theirs.train()
    ours.train()
    torch.manual_seed(3)
    their_out = theirs(images)
    torch.manual_seed(3)
    torch.testing.assert_close(ours(images), their_out, **TOLERANCE)


def test_conv_dora_merged_weights_and_unmerge_equal_peft(images):
    theirs, ours = build_pair(make_cnn, target_modules=CNN_TARGETS, use_dora=True)
    unmerged = cnn_out(ours, images)
    theirs.merge_adapter()
    ours.merge_adapter()
    assert_same_state(ours, theirs)
    torch.testing.assert_close(cnn_out(ours, images), unmerged, atol=1e-5, rtol=1e-5)
    theirs.unmerge_adapter()
    ours.unmerge_adapter()
    assert_same_state(ours, theirs)


def test_vit_dora_adapter_round_trips_through_peft_both_ways(tmp_path, pixel_values):
    theirs, ours = build_pair(make_vit, target_modules=VIT_TARGETS, use_dora=True)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    loaded_by_us = lora_engine.PeftModel.from_pretrained(make_vit(), tmp_path / "peft")
    loaded_by_peft = peft.PeftModel.from_pretrained(make_vit(), tmp_path / "ours")
    expected = vit_logits(theirs, pixel_values)
    torch.testing.assert_close(vit_logits(loaded_by_us, pixel_values), expected, **TOLERANCE)
    torch.testing.assert_close(vit_logits(loaded_by_peft, pixel_values), expected, **TOLERANCE)


def test_dora_on_a_grouped_conv_is_refused_naming_it():
    config = lora_engine.LoraConfig(target_modules=["grouped"], r=4, use_dora=True)
    with pytest.raises(ValueError, match=r"use_dora=True on a Conv2d with groups=2.*not supported yet"):
        lora_engine.get_peft_model(make_cnn(), config)


def test_conv_dora_rows_of_a_mixed_batch_equal_single_adapter_runs():
    """peft refuses DoRA in mixed batches; ours runs each sample as a forward with its adapter alone would."""
    model = lora_engine.get_peft_model(
        make_cnn(), lora_engine.LoraConfig(target_modules=CNN_TARGETS, use_dora=True, init_lora_weights=False)
    )
    model.add_adapter(
        "plain", lora_engine.LoraConfig(target_modules=["strided"], r=2, init_lora_weights=False)
    )
    move_dora_magnitudes_off_their_norms(model)
    model.eval()
    routes = ["default", "__base__", "plain", "default"]
    images = torch.randn(len(routes), 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def run(model, images, **kwargs):
        return model(images, **kwargs)

    mixed, alone = mixed_batch_and_single_runs(model, run, images, routes)
    torch.testing.assert_close(mixed, alone, **TOLERANCE)
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-4)  # the adapter changes the output
