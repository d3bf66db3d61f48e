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


def test_wrong_number_of_axes():
    """Refused when the user set `modality_num_dim`, or a position embedding needs the axes."""
    for kwargs in (dict(modality_num_dim=(2, 1)), dict(add_pos_emb=(True, False))):
        model = make_model(dim_latent=(8, 4), modality_default_shape=((2, 2), (3,)), **kwargs)
        with pytest.raises(ValueError, match=r"modalities.*3 spatial axes.*expected 2"):
            model([[randint(0, 16, (3,)), (0, randn(2, 2, 2, 8))]])
        with pytest.raises(ValueError, match="fixed_modality_shape"):
            model.generate_modality_only(modality_type=0, fixed_modality_shape=(4,))


def test_other_number_of_axes_accepted_as_012_did(model):
    """`modality_num_dim` only read off `modality_default_shape`, no position embedding: 0.12 took
    latents of another number of axes, so do we (with a warning)."""
    with pytest.warns(UserWarning, match="3 spatial axes"):
        model([[randint(0, 16, (3,)), (0, randn(2, 2, 2, 8))]]).backward()
    with pytest.warns(UserWarning, match="modality_num_dim"):
        assert model.generate_modality_only(modality_type=0, fixed_modality_shape=(4,), modality_steps=2).shape == (1, 4, 8)


def test_internal_ids_in_training_text_are_refused(model):
    ids = model.ids
    with pytest.raises(ValueError, match=r"modalities\[0\]\[0\].*id \d+ at position 1, a shape-character id outside"):
        model([[torch.tensor([1, ids.char_offset + ord("x")])]])
    with pytest.raises(ValueError, match=r"modalities\[1\]\[0\].*at position 4, a shape-character id"):
        model([[torch.tensor([1, 2])], [torch.tensor([1, *ids.encode_shape((2,)), ids.som[0], ids.char_offset + ord("7")])]])
    # what a user may write: text, sos / eos / som / eom / meta, and a shape string after [meta]
    model([[torch.tensor([ids.sos, 3, *ids.encode_shape((2, 2)), ids.som[0]]), randn(2, 2, 8), torch.tensor([ids.eom[0], 4, ids.eos])]]).backward()
    # a prompt may hold any id of the vocabulary (a sample the model wrote can be fed back)
    model.sample(prompt=torch.tensor([3, ids.char_offset + 5]), max_length=1)


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


# found by fuzzing the public entry points


def test_latents_in_another_float_dtype_are_cast(model):
    batch = [[randint(0, 16, (3,)), randn(2, 2, 8)], [(1, randn(3, 4).double()), randint(0, 16, (2,))]]  # numpy data arrives as float64
    torch.manual_seed(0)
    as_float64 = model(batch)
    batch[1][0] = (1, batch[1][0][1].float())
    torch.manual_seed(0)
    assert torch.allclose(as_float64, model(batch))
    velocities = model(randn(2, 2, 2, 8, dtype=torch.float64), modality_type=0, times=torch.rand(2), return_loss=False)
    assert velocities.dtype == torch.float32
    assert model.token_lengths([[randn(2, 2, 8).half()]]) == [1 + 5 + 4 + 1 + 1]


def test_empty_axis_and_scalar_modality(model):
    with pytest.raises(ValueError, match=r"modalities.*empty axis"):
        model([[randint(0, 16, (3,)), randn(0, 2, 8)]])
    with pytest.raises(ValueError, match="`modalities` must be a batch"):
        model(torch.tensor(1.0), modality_type=0)


@pytest.mark.parametrize("times", [torch.full((1, 1), float("nan")), torch.full((1, 1), 1.5)])
def test_interleaved_times_nan_or_out_of_range(model, times):
    with pytest.raises(ValueError, match="`times`"):
        model([[randint(0, 16, (3,)), randn(2, 2, 8)]], times=times)


@pytest.mark.parametrize("times", [torch.tensor([0.5, float("nan"), 0.2]), torch.tensor([0.5, 5.0, 0.2]), torch.rand(2), [0.1, 0.2, 0.3], torch.rand(3, 0)])
def test_modality_only_times(model, times):
    with pytest.raises(ValueError, match="`times`"):
        model(randn(3, 2, 2, 8), modality_type=0, times=times)


def test_modality_only_times_of_interleaved_shape_use_column_0(model):
    latents, times = randn(3, 2, 2, 8), torch.rand(3, 4)
    torch.manual_seed(1)
    wide = model(latents, modality_type=0, times=times)
    torch.manual_seed(1)
    assert torch.allclose(wide, model(latents, modality_type=0, times=times[:, 0]))


def test_only_the_times_in_use_are_checked(model):
    batch = [[randint(0, 16, (3,)), randn(2, 2, 8)], [randn(2, 2, 8), randn(2, 2, 8)]]
    model(batch, times=torch.tensor([[0.3, float("nan")], [0.2, 0.7]]))  # sample 0 has one modality: its padding is never read


def test_modality_only_lists(model):
    with pytest.raises(TypeError, match=r"`modalities\[1\]`"):
        model([randn(2, 2, 8), None], modality_type=0)
    with pytest.raises(TypeError, match="`modality_type`"):
        model(randint(0, 16, (2, 4)), modality_type=0)
    single = make_model(dim_latent=8, modality_default_shape=(2, 2))
    single([randn(2, 2, 8), randn(3, 1, 8)]).backward()  # a list of latents needs no modality_type with one modality


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(seq_len=5.0), TypeError, "seq_len"),
        (dict(seq_len=12, temperature=float("nan")), ValueError, "temperature"),
        (dict(seq_len=12, temperature="hot"), TypeError, "temperature"),
        (dict(seq_len=12, min_p=2.0), ValueError, "min_p"),
        (dict(seq_len=12, min_p=None), TypeError, "min_p"),
    ],
)
def test_generate_text_only_arguments(model, kwargs, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        model.generate_text_only(randint(0, 16, (1, 10)), **kwargs)


def test_generate_text_only_empty_prompt_batch(model):
    with pytest.raises(ValueError, match="`prompt`"):
        model.generate_text_only(randint(0, 16, (0, 4)), 8)
    assert model.generate_text_only(randint(0, 16, (2, 4)), 3).shape == (2, 0)  # `seq_len` counts the prompt, as in 0.12


def test_numbers_given_as_numpy_or_0d_tensors(model):
    import numpy as np

    latents = model.generate_modality_only(batch_size=np.int64(2), modality_type=np.int64(0), modality_steps=torch.tensor(3), cfg_scale=1.0)
    assert latents.shape == (2, 2, 2, 8)
    text = model.generate_text_only(randint(0, 16, (1, 3)), np.int64(6), temperature=torch.tensor(1.0), min_p=np.float32(0.1))
    assert text.shape == (1, 3)
    prompt = torch.tensor([3, *model.ids.encode_shape((2, 3)), model.ids.som[0]])
    sample = model.sample(
        prompt=prompt, max_length=np.int64(8), text_temperature=torch.tensor(1.0), modality_steps=np.int64(3), fixed_modality_shape=[np.int64(2), 3]
    )
    assert sample[1][1].shape == (2, 3, 8)
    model([[randint(0, 16, (3,)), randn(2, 2, 8)]], modality_type=np.int64(0), velocity_consistency_delta_time=torch.tensor(1e-3))


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(text_temperature=float("inf")), ValueError, "text_temperature"),
        (dict(text_temperature=None), TypeError, "text_temperature"),
        (dict(text_min_p=-1.0), ValueError, "text_min_p"),
        (dict(modality_steps=2.5), TypeError, "modality_steps"),
        (dict(modality_steps=1), ValueError, "modality_steps"),
        (dict(cache_kv=1), TypeError, "cache_kv"),
        (dict(return_unprocessed_modalities="yes"), TypeError, "return_unprocessed_modalities"),
        (dict(cfg_scale=float("nan")), ValueError, "cfg_scale"),
        (dict(fixed_modality_shape=(True, True)), ValueError, "fixed_modality_shape"),
        (dict(init_modality_noise=torch.full((4, 8), float("nan"))), ValueError, "init_modality_noise"),
        (dict(prompt=randint(0, 16, (2, 3))), ValueError, "prompt"),
    ],
)
def test_sample_arguments(model, kwargs, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        model.sample(max_length=4, **kwargs)


def test_generate_modality_only_arguments(model):
    with pytest.raises(TypeError, match="`modality_steps`"):
        model.generate_modality_only(modality_type=0, modality_steps="4")
    with pytest.raises(TypeError, match="`return_unprocessed_modalities`"):
        model.generate_modality_only(modality_type=0, return_unprocessed_modalities=None)


def test_forward_flags(model):
    batch = [[randint(0, 16, (3,)), randn(2, 2, 8)]]
    for kwargs, error, name in [
        (dict(return_loss="no"), TypeError, "return_loss"),
        (dict(return_breakdown="x"), TypeError, "return_breakdown"),
        (dict(velocity_consistency_delta_time=-1.0), ValueError, "velocity_consistency_delta_time"),
        (dict(num_modalities_to_times_fn=3), TypeError, "num_modalities_to_times_fn"),
        (dict(modality_type=5), ValueError, "modality_type"),
    ]:
        with pytest.raises(error, match=f"`{name}`"):
            model(batch, **kwargs)


def test_text_only_batches(model):
    text = randint(0, 16, (2, 6))
    with pytest.raises(ValueError, match="`pack`"):
        model(text, pack=True)
    ema = model.create_ema()
    model(text, times=torch.rand(2, 1), velocity_consistency_ema_model=ema)  # nothing to act on, ignored as in 0.12
    with pytest.raises(ValueError, match="seq >= 2"):
        model(randint(0, 16, (2, 1)))
    with pytest.raises(ValueError, match="`pack`"):
        model(randn(2, 2, 2, 8), modality_type=0, pack=True)


def test_modality_only_honours_num_modalities_to_times_fn(model):
    seen = []

    def times_fn(counts):
        seen.append(counts.tolist())
        return torch.full((len(counts), 1), 0.25)

    latents = randn(3, 2, 2, 8)
    torch.manual_seed(1)
    from_fn = model(latents, modality_type=0, num_modalities_to_times_fn=times_fn)
    torch.manual_seed(1)
    assert torch.allclose(from_fn, model(latents, modality_type=0, times=torch.full((3,), 0.25)))
    assert seen == [[1, 1, 1]]


def test_data_helpers_name_bad_arguments():
    from transfusion_pytorch import collate_fn, padding_fraction
    from transfusion_pytorch.data import pack_samples

    with pytest.raises(ValueError, match="`batches`"):
        padding_fraction([[0, 3]], [1, 2])
    with pytest.raises(ValueError, match="`lengths`"):
        pack_samples([3, -1], 4)
    with pytest.raises(TypeError, match="`data`"):
        collate_fn(None)


@pytest.mark.parametrize("name", ["flow_loss_weight", "text_loss_weight", "velocity_consistency_loss_weight", "reconstruction_loss_weight"])
def test_loss_weights_must_be_finite_and_not_negative(name):
    with pytest.raises(ValueError, match=name):
        make_model(**{name: -1.0})
    with pytest.raises(ValueError, match=name):
        make_model(**{name: float("nan")})
    with pytest.raises(TypeError, match=name):
        make_model(**{name: "1"})
    assert getattr(make_model(**{name: 0}), name) == 0.0  # zero switches the term off
