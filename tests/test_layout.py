import torch

from transfusion_pytorch.layout import SpecialIds, build_layout, default_to_modality_shape_fn, text_labels


def test_special_ids_follow_012_layout():
    ids = SpecialIds(num_text_tokens=10, num_modalities=2)
    assert (ids.sos, ids.eos) == (10, 11)
    assert ids.som == (12, 13) and ids.eom == (14, 15)
    assert ids.meta == 16 and ids.char_offset == 17
    assert ids.vocab_size == 17 + 128


def test_shape_string_round_trip():
    ids = SpecialIds(5, 1)
    tokens = ids.encode_shape((12, 7))
    assert tokens[0] == ids.meta
    assert ids.decode_chars(tokens[1:]) == "12,7"
    assert default_to_modality_shape_fn("12,7") == (12, 7)
    assert default_to_modality_shape_fn("") == ()
    assert ids.encode_shape(()) == [ids.meta]


def test_layout_positions_and_instances():
    rows = [[torch.tensor([1, 2]), 0, torch.tensor([3])], [torch.tensor([4]), 1]]
    layout = build_layout(rows, [3, 2])
    assert layout.token_ids.tolist() == [[1, 2, -1, -1, -1, 3], [4, -1, -1, -1, -1, -1]]
    # the image shares one position; text after it continues one step further
    assert layout.positions[0].tolist() == [0, 1, 2, 2, 2, 3]
    assert layout.token_instance.tolist() == [[-1, -1, 0, 0, 0, -1], [-1, 1, 1, -1, -1, -1]]
    assert layout.lengths.tolist() == [6, 3]
    assert layout.instance_index.tolist() == [2, 3, 4, 7, 8]
    assert layout.instance_offsets == [(0, 2, 3), (1, 1, 2)]


def test_labels_skip_modality_tokens_and_padding():
    layout = build_layout([[torch.tensor([1, 2]), 0, torch.tensor([3, 4])], [torch.tensor([5])]], [2])
    labels = text_labels(layout, ignore_index=-100)
    assert labels.tolist() == [[2, -100, -100, -100, 4, -100], [-100] * 6]
