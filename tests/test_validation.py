"""Bad input raises ValueError / TypeError whose message names the argument (SPEC.md §7)."""

import pytest
import torch
from torch import randint, randn

from conftest import make_model, tiny_transformer
from transfusion_pytorch import Transfusion


@pytest.fixture
def model():
    return make_model(dim_latent=(8, 4), modality_default_shape=((2, 2), (3,)))


def test_latent_of_wrong_width(model):
    with pytest.raises(ValueError, match=r"modalities.*expected 8 channels"):
        model([[randint(0, 16, (3,)), (0, randn(2, 2, 7))]])


def test_unknown_modality_type(model):
    with pytest.raises(ValueError, match=r"modalities\[0\]\[1\]\[0\].*\[0, 2\)"):
        model([[randint(0, 16, (3,)), (5, randn(2, 2, 8))]])
    with pytest.raises(TypeError, match="modality_type"):
        model.generate_modality_only(modality_type="image")
    with pytest.raises(ValueError, match="modality_type"):
        model.generate_modality_only(modality_type=2)


def test_missing_modality_type_with_two_modalities(model):
    with pytest.raises(ValueError, match="modality_type"):
        model.generate_modality_only()


def test_wrong_number_of_axes(model):
    with pytest.raises(ValueError, match=r"modalities.*3 spatial axes.*expected 2"):
        model([[randint(0, 16, (3,)), (0, randn(2, 2, 2, 8))]])
    with pytest.raises(ValueError, match="fixed_modality_shape"):
        model.generate_modality_only(modality_type=0, fixed_modality_shape=(4,))


def test_text_id_out_of_range(model):
    with pytest.raises(ValueError, match=r"modalities\[0\]\[0\].*text id 999"):
        model([[torch.tensor([1, 999])]])
    with pytest.raises(ValueError, match="text id -3"):
        model(torch.tensor([[1, -3]]))
    with pytest.raises(ValueError, match="prompt.*text id"):
        model.generate_text_only(torch.tensor([[100000]]), 4)


def test_float_where_text_expected(model):
    with pytest.raises(TypeError, match="prompt"):
        model.generate_text_only(torch.randn(1, 4), 8)


def test_bad_item_types(model):
    with pytest.raises(TypeError, match=r"modalities\[0\]\[0\]"):
        model([["hello"]])
    with pytest.raises(TypeError, match=r"modalities\[0\]"):
        model([torch.tensor([1, 2])])
    with pytest.raises(TypeError, match=r"modalities\[0\]\[0\]\[1\]"):
        model([[(0, torch.tensor([1, 2]))]])
    with pytest.raises(ValueError, match=r"modalities\[0\]\[0\].*1-D"):
        model([[torch.ones(2, 2, dtype=torch.long)]])


def test_empty_batch(model):
    with pytest.raises(ValueError, match="modalities"):
        model([])
    with pytest.raises(ValueError, match="modalities"):
        model(torch.empty(0, 5, dtype=torch.long))


def test_text_batch_of_wrong_rank(model):
    with pytest.raises(ValueError, match=r"modalities.*\(batch, seq\)"):
        model(torch.tensor([1, 2, 3]))


def test_bad_times(model):
    batch = [[randint(0, 16, (3,)), (0, randn(2, 2, 8))]]
    with pytest.raises(ValueError, match="times"):
        model(batch, times=torch.rand(2, 1))
    with pytest.raises(ValueError, match="times"):
        model(batch, times=torch.full((1, 1), 2.0))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="dim_latent"):
        Transfusion(num_text_tokens=4, dim_latent=0, transformer=tiny_transformer())
    with pytest.raises(ValueError, match="channel_first_latent"):
        Transfusion(num_text_tokens=4, dim_latent=(4, 4), channel_first_latent=(True, False, True), transformer=tiny_transformer())
    with pytest.raises(ValueError, match="modality_num_dim"):
        Transfusion(num_text_tokens=4, dim_latent=4, modality_num_dim=4, transformer=tiny_transformer())
    with pytest.raises(ValueError, match="modality_default_shape"):
        Transfusion(num_text_tokens=4, dim_latent=4, modality_default_shape=(2, 2), modality_num_dim=1, transformer=tiny_transformer())
    with pytest.raises(ValueError, match="add_pos_emb"):
        Transfusion(num_text_tokens=4, dim_latent=4, add_pos_emb=True, transformer=tiny_transformer())
    with pytest.raises(TypeError, match="transformer"):
        Transfusion(num_text_tokens=4, dim_latent=4, transformer=[64, 2])
    with pytest.raises(ValueError, match="num_text_tokens"):
        Transfusion(num_text_tokens=-1, dim_latent=4, transformer=tiny_transformer())
    with pytest.raises(ValueError, match="depth"):
        Transfusion(num_text_tokens=4, transformer=dict(dim=32, depth=0))
    with pytest.raises(ValueError, match="num_residual_streams"):
        Transfusion(num_text_tokens=4, transformer=dict(dim=32, depth=1, num_residual_streams=0))


def test_bad_sampling_arguments(model):
    with pytest.raises(ValueError, match="max_length"):
        model.sample(max_length=0)
    with pytest.raises(TypeError, match="prompt"):
        model.sample(prompt="a cat")
    with pytest.raises(ValueError, match="modality_steps"):
        model.generate_modality_only(modality_type=0, modality_steps=1)
    with pytest.raises(ValueError, match="batch_size"):
        model.generate_modality_only(modality_type=0, batch_size=0)
    no_default = make_model(dim_latent=8)
    with pytest.raises(ValueError, match="modality_default_shape"):
        no_default.generate_modality_only()
    with pytest.raises(ValueError, match="attention_backend"):
        no_default.attention_backend = "cuda"
        no_default([[randint(0, 16, (2,)), randn(2, 8)]])


def test_ema_model_of_wrong_type(model):
    with pytest.raises(TypeError, match="velocity_consistency_ema_model"):
        model([[randint(0, 16, (3,))]], velocity_consistency_ema_model=torch.nn.Linear(2, 2))
